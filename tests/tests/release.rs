//! Releases through the real daemon: `emberctl deploy`, `rollback`,
//! `history` and `rollout` (and raw Varlink `Deploy`) moving real modules
//! from one revision to another while HTTP clients keep calling them, a
//! revision that cannot start, one that crashes after taking over, canaries,
//! and kill -9 of emberd in the middle of a rollout.
//!
//! Waits are polls with a deadline ([`ember_tests::PATIENCE`]); nothing
//! asserts how long anything took.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_tests::daemon::*;
use ember_tests::load::{self, Load};
use ember_tests::procs::{children_of, reap_orphans, zygote_family};
use ember_tests::{artifact, poll_until, ChildGuard};
use serde_json::{json, Value};

const EVERY: Duration = Duration::from_millis(20);

fn daemon() -> Daemon {
    Daemon::start(&format!("[pool]\nmin_idle = 2\nmax_idle = 4\n{FAST}"))
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One revision of an HTTP module named `name`: the greeter example (or
/// another crate, same listener), its version, greeting and rollout
/// settings. `trailer`: the module directory gets its own copy of the
/// cdylib with these bytes appended (a distinct artifact, same code);
/// `None`: the manifest names the built cdylib itself.
#[derive(Debug, Clone)]
struct Web {
    name: &'static str,
    krate: &'static str,
    version: String,
    greeting: String,
    port: u16,
    replicas: u32,
    stable_after: &'static str,
    import_kv: bool,
    trailer: Option<String>,
    /// More `[config]` lines.
    config: String,
}

impl Web {
    fn greeter(version: &str, greeting: &str) -> Self {
        Web {
            name: "web",
            krate: "greeter",
            version: version.into(),
            greeting: greeting.into(),
            port: 0,
            replicas: 3,
            stable_after: "300ms",
            import_kv: false,
            trailer: None,
            config: String::new(),
        }
    }

    fn dir(&self, parent: &Path) -> PathBuf {
        parent.join(format!("{}-{}", self.name, self.version))
    }

    /// Writes the module directory (again: the port may have changed).
    fn write(&self, parent: &Path) -> PathBuf {
        let d = self.dir(parent);
        std::fs::create_dir_all(&d).unwrap();
        let entry = match &self.trailer {
            None => format!("{:?}", artifact(self.krate).display().to_string()),
            Some(t) => {
                let file = format!("lib{}.so", self.krate.replace('-', "_"));
                let mut bytes = std::fs::read(artifact(self.krate)).unwrap();
                bytes.extend_from_slice(format!("\0ember-test-trailer {t}\0").as_bytes());
                std::fs::write(d.join(&file), bytes).unwrap();
                format!("{file:?}")
            }
        };
        let imports = if self.import_kv {
            "[[imports]]\nname = \"kv\"\noptional = true\n"
        } else {
            ""
        };
        std::fs::write(
            d.join("module.toml"),
            format!(
                "name = \"{}\"\nversion = \"{}\"\nentry = {entry}\nreplicas = {}\n{imports}\
                 [[listeners]]\nname = \"http\"\naddress = \"127.0.0.1:{}\"\n\
                 [limits]\nstart_deadline = \"3s\"\nstop_deadline = \"2s\"\n\
                 [rollout]\nstable_after = \"{}\"\n\
                 [config]\ngreeting = \"{}\"\n{}",
                self.name,
                self.version,
                self.replicas,
                self.port,
                self.stable_after,
                self.greeting,
                self.config
            ),
        )
        .unwrap();
        d
    }

    /// What `/hello/<who>` answers from this revision, up to the replica.
    fn hello_prefix(&self, who: &str) -> String {
        format!(
            "{}, {who}! (from {}@{}#",
            self.greeting, self.name, self.version
        )
    }

    fn sha256(&self, parent: &Path) -> String {
        use sha2::Digest;
        let file = match &self.trailer {
            Some(_) => self
                .dir(parent)
                .join(format!("lib{}.so", self.krate.replace('-', "_"))),
            None => artifact(self.krate),
        };
        hex(&sha2::Sha256::digest(std::fs::read(file).unwrap()))
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Installs `w` through `emberctl deploy --wait` on a free port (retried
/// while another test grabs the port: exit 5), then waits until every
/// replica runs. Returns the module directory.
fn first_deploy(d: &Daemon, w: &mut Web) -> PathBuf {
    let dir = poll_until("a free port", Duration::ZERO, || {
        w.port = free_port();
        let dir = w.write(d.dir.path());
        let out = d.ctl(&["deploy", dir.to_str().unwrap(), "--wait"]);
        match out.status.code() {
            Some(0) => {
                // Deploy of a module not installed: an install, revision 1.
                let text = stdout(&out);
                assert!(
                    text.ends_with(&format!(
                        "installed {} {} (revision 1)\n",
                        w.name, w.version
                    )),
                    "{text}"
                );
                Ok(dir)
            }
            Some(5) => Err(stderr(&out)),
            _ => panic!("deploy {}: {}{}", w.name, stdout(&out), stderr(&out)),
        }
    });
    all_running(d, w.name, w.replicas, 1);
    dir
}

/// Waits until the module is on `revision`, no rollout, `n` replicas all
/// running that revision; returns the status.
fn all_running(d: &Daemon, name: &str, n: u32, revision: u64) -> Value {
    d.wait_status(name, &format!("{n} replicas of revision {revision}"), |s| {
        let reps = s["replicas"].as_array().unwrap();
        s["revision"] == revision
            && s["rollout"].is_null()
            && reps.len() == n as usize
            && reps
                .iter()
                .all(|r| r["state"] == "running" && r["revision"] == revision)
    })
}

fn replica_pids(s: &Value) -> Vec<i32> {
    s["replicas"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["pid"].as_i64().map(|p| p as i32))
        .collect()
}

fn status(d: &Daemon, name: &str) -> Value {
    d.ctl_json(&["status", name])["status"].clone()
}

fn history(d: &Daemon, name: &str) -> Vec<Value> {
    d.ctl_json(&["history", name])["revisions"]
        .as_array()
        .unwrap()
        .clone()
}

/// (outcome, reason) of `revision` in the module's history.
fn outcome(h: &[Value], revision: u64) -> (String, Option<String>) {
    let r = h
        .iter()
        .find(|r| r["revision"] == revision)
        .unwrap_or_else(|| panic!("revision {revision} not in history: {h:?}"));
    (
        r["outcome"].as_str().unwrap().to_owned(),
        r["reason"].as_str().map(str::to_owned),
    )
}

/// `emberctl history NAME` as rows of (REV, VERSION, OUTCOME…), checking
/// the header.
fn history_rows(d: &Daemon, name: &str) -> Vec<(u64, String, String)> {
    let out = d.ctl_ok(&["history", name]);
    let text = stdout(&out);
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        ["REV", "VERSION", "SHA256", "DEPLOYED", "OUTCOME"],
        "{text}"
    );
    lines
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert!(cols.len() >= 5, "{text}");
            (
                cols[0].parse().unwrap(),
                cols[1].to_owned(),
                cols[4..].join(" "),
            )
        })
        .collect()
}

/// `n` GETs of `/hello/probe`, every one answered by `w`'s revision.
fn assert_serves_only(w: &Web, n: usize) {
    let want = w.hello_prefix("probe");
    for i in 0..n {
        match load::get(addr(w.port), "/hello/probe") {
            Ok((200, body)) if body.starts_with(&want) => {}
            other => panic!("probe {i}: want {want:?}…, got {other:?}"),
        }
    }
}

/// Waits until `/hello/probe` answers (a restarted daemon binds again),
/// then as [`assert_serves_only`].
fn wait_serving(w: &Web, n: usize) {
    poll_until("an answer on the port", EVERY, || {
        load::get(addr(w.port), "/hello/probe").map(drop)
    });
    assert_serves_only(w, n);
}

/// Waits until every pid has exited and been reaped by emberd.
fn assert_reaped(pids: &[i32], what: &str) {
    for &p in pids {
        assert!(wait_reaped(p), "{what}: worker {p} is still there");
    }
}

/// Waits until emberd's children are exactly its zygote, its idle pool
/// and the replicas its modules report: no worker left over.
fn assert_no_stray_workers(d: &Daemon) {
    poll_until("only expected workers", EVERY, || {
        let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;
        let idle: Vec<i32> = d.ctl_json(&["pool"])["pool"]["idle_pids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_i64().unwrap() as i32)
            .collect();
        let mut known: BTreeSet<i32> = idle.into_iter().collect();
        known.insert(zygote);
        for m in d.ctl_json(&["list"])["modules"].as_array().unwrap() {
            for p in m["pids"].as_array().unwrap() {
                known.insert(p.as_i64().unwrap() as i32);
            }
        }
        let stray: Vec<i32> = children_of(d.pid())
            .into_iter()
            .filter(|p| !known.contains(p))
            .collect();
        if stray.is_empty() {
            Ok(())
        } else {
            Err(format!("stray children {stray:?} (known {known:?})"))
        }
    });
}

/// `emberctl deploy ARGS --wait --json`: exit code, every reply (progress
/// and final), stderr.
fn deploy_wait_json(d: &Daemon, args: &[&str]) -> (Option<i32>, Vec<Value>, String) {
    let mut a = vec!["deploy"];
    a.extend_from_slice(args);
    a.extend_from_slice(&["--wait", "--json"]);
    let out = d.ctl(&a);
    let replies = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    (out.status.code(), replies, stderr(&out))
}

/// `emberctl ARGS` started in the background (its output piped).
fn spawn_ctl(d: &Daemon, args: &[&str]) -> ChildGuard {
    ChildGuard(
        Command::new(emberctl())
            .arg("--socket")
            .arg(&d.socket)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    )
}

/// Waits for a background `emberctl` to exit: its code, stdout, stderr.
fn finish_ctl(mut c: ChildGuard) -> (Option<i32>, String, String) {
    use std::io::Read;
    let st = c
        .wait_timeout(Duration::from_secs(60))
        .expect("emberctl did not exit");
    let mut out = String::new();
    let mut err = String::new();
    c.0.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    c.0.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    (st.code(), out, err)
}

/// Waits until `revision` of `name` is in the daemon's state file
/// (`desired.json`), as written to disk.
fn wait_recorded(d: &Daemon, name: &str, revision: u64) {
    let file = d.state.join("desired.json");
    poll_until("the revision on disk", Duration::from_millis(2), || {
        let text = std::fs::read_to_string(&file).map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let revs = v["modules"][name]["revisions"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if revs.iter().any(|r| r["revision"] == revision) {
            Ok(())
        } else {
            Err(format!("{revs:?}"))
        }
    });
}

/// kill -9 of emberd; waits until its zygote and workers are gone too.
fn kill_9(d: &mut Daemon) {
    let old_emberd = d.pid();
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    poll_until("no process of the killed emberd", EVERY, || {
        reap_orphans();
        let left = zygote_family(old_emberd);
        if left.is_empty() {
            Ok(())
        } else {
            Err(format!("left running: {left:?}"))
        }
    });
}

/// Waits until the module's rollout satisfies `f`; returns the status.
fn wait_rollout(d: &Daemon, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    d.wait_status(name, what, |s| !s["rollout"].is_null() && f(&s["rollout"]))
}

// ---------------------------------------------------------------------------

#[test]
fn deploy_installs_then_is_unchanged_and_install_is_refused() {
    let d = daemon();
    let m = module_dir(d.dir.path(), "app", "1.0.0");
    let path = m.to_str().unwrap();

    // Deploy of a module not installed: an install, revision 1 (raw
    // Varlink, to see every field of the reply).
    let mut raw = Raw::connect(&d.socket);
    let r = raw.call("io.ember.Supervisor.Deploy", json!({ "path": path }));
    let p = &r["parameters"];
    assert_eq!(p["outcome"], "installed", "{r}");
    assert_eq!(p["revision"], 1, "{r}");
    assert_eq!(p["changed"], true, "{r}");
    assert_eq!(p["module"]["name"], "app", "{r}");
    let s = all_running(&d, "app", 1, 1);
    let pid = replica_pids(&s);

    // The identical artifact and manifest again: unchanged, through the
    // CLI with and without --wait, and raw.
    let out = d.ctl_ok(&["deploy", path]);
    assert_eq!(
        stdout(&out),
        "app: unchanged (revision 1 is already active)\n"
    );
    let out = d.ctl_ok(&["deploy", path, "--wait"]);
    assert_eq!(
        stdout(&out),
        "app: unchanged (revision 1 is already active)\n"
    );
    let r = raw.call("io.ember.Supervisor.Deploy", json!({ "path": path }));
    let p = &r["parameters"];
    assert_eq!(
        (&p["outcome"], &p["revision"], &p["changed"]),
        (&json!("unchanged"), &json!(1), &json!(false)),
        "{r}"
    );
    // Nothing moved: same worker, one revision, active.
    let s = status(&d, "app");
    assert_eq!(replica_pids(&s), pid);
    assert_eq!(s["revision"], 1);
    assert_eq!(s["restarts"], 0);
    let h = history(&d, "app");
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(outcome(&h, 1), ("active".into(), None));
    assert_eq!(h[0]["version"], "1.0.0");
    let rows = history_rows(&d, "app");
    assert_eq!(rows, vec![(1, "1.0.0".into(), "active".into())]);
    let list = d.ctl_json(&["list"]);
    assert_eq!(list["modules"][0]["revision"], 1, "{list}");

    // Install of an installed module: refused (conflict), pointing at deploy.
    let out = d.ctl(&["install", path]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert!(stderr(&out).contains("emberctl deploy"), "{}", stderr(&out));
    assert_eq!(replica_pids(&status(&d, "app")), pid);
}

#[test]
fn surge_deploys_under_load_fail_no_request() {
    let d = daemon();
    let mut a = Web::greeter("1.0.0", "hi");
    first_deploy(&d, &mut a);
    let b = Web {
        version: "2.0.0".into(),
        greeting: "yo".into(),
        ..a.clone()
    };
    let b_dir = b.write(d.dir.path());
    let a_dir = a.dir(d.dir.path());
    assert_serves_only(&a, 6);

    let load = Load::get(addr(a.port), 4, "/hello/load");
    // Deploy b, a, b, a: a deploy of content identical to an earlier
    // revision takes that revision's number again.
    let mut windows = Vec::new();
    for (i, (to, dir, revision)) in [(&b, &b_dir, 2), (&a, &a_dir, 1)]
        .into_iter()
        .cycle()
        .take(4)
        .enumerate()
    {
        let before = all_running(&d, "web", 3, if i % 2 == 0 { 1 } else { 2 });
        let old = replica_pids(&before);
        let t0 = Instant::now();
        let (code, replies, err) = deploy_wait_json(&d, &[dir.to_str().unwrap()]);
        let t1 = Instant::now();
        assert_eq!(code, Some(0), "deploy {i}: {err} {replies:?}");
        let last = replies.last().unwrap();
        assert_eq!(last["outcome"], "completed", "{last}");
        assert_eq!(last["revision"], revision, "{last}");
        assert_eq!(last["changed"], true, "{last}");
        // Surge: never more new replicas than the module has, never more
        // old ones than it had.
        for r in replies
            .iter()
            .filter_map(|r| r["module"]["rollout"].as_object())
        {
            assert_eq!(r["strategy"], "surge");
            assert!(r["new_replicas"].as_u64().unwrap() <= 3, "{r:?}");
            assert!(r["old_replicas"].as_u64().unwrap() <= 3, "{r:?}");
        }
        let phases: Vec<&str> = replies
            .iter()
            .filter_map(|r| r["module"]["rollout"]["phase"].as_str())
            .collect();
        assert_eq!(phases.last(), Some(&"stabilizing"), "{phases:?}");

        // Every answer from the new revision; the old workers are gone.
        assert_serves_only(to, 10);
        assert_reaped(&old, "old revision");
        let s = all_running(&d, "web", 3, revision);
        assert_eq!(s["version"], to.version.as_str());
        assert!(replica_pids(&s).iter().all(|p| !old.contains(p)));
        let list = d.ctl_json(&["list"]);
        let web = &list["modules"][0];
        assert_eq!(
            (&web["revision"], &web["version"]),
            (&json!(revision), &json!(to.version)),
            "{list}"
        );
        let text = stdout(&d.ctl_ok(&["status", "web"]));
        assert!(
            text.contains(&format!("\n  revision: {revision}\n")),
            "{text}"
        );
        assert!(!text.contains("rollout:"), "{text}");
        windows.push((t0, t1, to.clone()));
    }
    let report = load.stop();
    report.assert_no_failures("clients during four surge deploys");
    for (i, (t0, t1, to)) in windows.iter().enumerate() {
        assert!(
            report.overlapping(*t0, *t1).count() > 0,
            "no request ran during deploy {i}"
        );
        let want = to.hello_prefix("load");
        // Once a deploy completed, only the new revision answers (until
        // the next deploy begins).
        let end = windows.get(i + 1).map(|w| w.0);
        for r in report
            .started_after(*t1)
            .filter(|r| end.is_none_or(|e| r.finished < e))
        {
            assert!(
                r.body().unwrap().starts_with(&want),
                "after deploy {i}: {:?}",
                r.body()
            );
        }
    }
    assert_no_stray_workers(&d);
    let rows = history_rows(&d, "web");
    assert_eq!(
        rows,
        vec![
            (2, "2.0.0".into(), "superseded".into()),
            (1, "1.0.0".into(), "active".into())
        ]
    );
}

#[test]
fn a_revision_that_cannot_start_aborts_and_the_old_one_keeps_serving() {
    let d = daemon();
    let mut a = Web::greeter("1.0.0", "hi");
    first_deploy(&d, &mut a);
    let before = status(&d, "web");
    let old = replica_pids(&before);
    let bad = Web {
        krate: "fixture-panic-start",
        version: "9.9.9".into(),
        ..a.clone()
    };
    let bad_dir = bad.write(d.dir.path());

    let load = Load::get(addr(a.port), 4, "/hello/load");
    let out = d.ctl(&["deploy", bad_dir.to_str().unwrap(), "--wait"]);
    let report = load.stop();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(
        err.contains("web: rollout of revision 2 (9.9.9) aborted: ")
            && err.contains("fixture panic in start")
            && err.contains("revision 1 is still active"),
        "{err}"
    );
    report.assert_no_failures("clients while a bad revision was deployed");
    let want = a.hello_prefix("load");
    assert!(report
        .records
        .iter()
        .all(|r| r.body().unwrap().starts_with(&want)));

    // The old revision untouched: same workers, never restarted.
    let s = all_running(&d, "web", 3, 1);
    assert_eq!(replica_pids(&s), old);
    assert_eq!(s["restarts"], 0);
    assert_eq!(s["version"], "1.0.0");
    assert_serves_only(&a, 6);
    let h = history(&d, "web");
    let (o, reason) = outcome(&h, 2);
    assert_eq!(o, "aborted");
    let reason = reason.unwrap();
    assert!(reason.contains("fixture panic in start"), "{reason}");
    assert_eq!(outcome(&h, 1), ("active".into(), None));
    let rows = history_rows(&d, "web");
    assert_eq!(rows[0].0, 2);
    assert_eq!(rows[0].2, format!("aborted: {reason}"));
    assert_eq!(rows[1], (1, "1.0.0".into(), "active".into()));
    assert_no_stray_workers(&d);

    // Without --wait, the same deploy is acknowledged once the revision is
    // on disk: `started` (exit 0), then it aborts; or, when the abort came
    // first, its outcome (exit 1).
    let out = d.ctl(&["deploy", bad_dir.to_str().unwrap()]);
    let said = format!("{}{}", stdout(&out), String::from_utf8_lossy(&out.stderr));
    match out.status.code() {
        Some(0) => assert!(
            said.starts_with("web: revision 2 (9.9.9) rolling out"),
            "{said}"
        ),
        Some(1) => assert!(said.contains("aborted"), "{said}"),
        other => panic!("deploy exited {other:?}: {said}"),
    }
    poll_until("the second abort", EVERY, || {
        let h = history(&d, "web");
        let s = status(&d, "web");
        if outcome(&h, 2).0 == "aborted" && s["rollout"].is_null() {
            Ok(())
        } else {
            Err(format!("{h:?}"))
        }
    });
    assert_eq!(replica_pids(&status(&d, "web")), old);
}

#[test]
fn a_revision_that_crashes_after_taking_over_is_rolled_back() {
    let d = daemon();
    let mut a = Web {
        replicas: 2,
        ..Web::greeter("1.0.0", "hi")
    };
    first_deploy(&d, &mut a);
    let trigger = d.dir.path().join("crash-now");
    // Ready, then running until the test creates the trigger file: the
    // crash comes once it has taken over (stabilizing, for up to an hour).
    let crasher = Web {
        krate: "fixture-segfault",
        version: "6.6.6".into(),
        stable_after: "60m",
        config: format!("crash_when_exists = {:?}\n", trigger.display().to_string()),
        ..a.clone()
    };
    let dir = crasher.write(d.dir.path());
    let old = replica_pids(&status(&d, "web"));
    let ctl = spawn_ctl(&d, &["deploy", dir.to_str().unwrap(), "--wait"]);
    let s = wait_rollout(&d, "web", "the crasher stabilizing", |r| {
        r["phase"] == "stabilizing"
    });
    assert_eq!(s["rollout"]["revision"], 2);
    assert_eq!(s["rollout"]["new_ready"], 2);
    assert_eq!(s["rollout"]["old_replicas"], 0);
    // Took over: the old workers are gone, the committed revision is still 1.
    assert_reaped(&old, "old revision after the takeover");
    assert_eq!(s["revision"], 1);
    let crashers = replica_pids(&s);
    assert_eq!(outcome(&history(&d, "web"), 2).0, "rolling-out");

    std::fs::write(&trigger, b"").unwrap();
    let (code, out, err) = finish_ctl(ctl);
    assert_eq!(code, Some(1), "{out}{err}");
    // (The line names revision 2 without its version: the last rollout
    // emberctl saw is the one back to revision 1.)
    assert!(
        err.contains("web: revision 2")
            && err.contains(" rolled back: revision 2 failed after taking over: ")
            && err.contains("killed by SIGSEGV")
            && err.contains("revision 1 is active again"),
        "{err}"
    );
    // Revision 1 again, in new workers; the crashed revision's are gone.
    let s = all_running(&d, "web", 2, 1);
    assert_eq!(s["version"], "1.0.0");
    assert_reaped(&crashers, "crashed revision");
    wait_serving(&a, 6);
    let h = history(&d, "web");
    let (o, reason) = outcome(&h, 2);
    assert_eq!(o, "rolled-back", "{h:?}");
    assert!(reason.as_deref().is_some_and(|r| !r.is_empty()), "{h:?}");
    assert_eq!(outcome(&h, 1), ("active".into(), None));
    let rows = history_rows(&d, "web");
    assert!(rows[0].2.starts_with("rolled-back: "), "{rows:?}");
    assert_eq!(rows[1], (1, "1.0.0".into(), "active".into()));
    assert_no_stray_workers(&d);
}

#[test]
fn an_exporter_release_fails_no_importer_call() {
    let d = daemon();
    let kv = |version: &str, max: u32| {
        let dir = d.dir.path().join(format!("kv-{version}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("module.toml"),
            format!(
                "name = \"kv\"\nversion = \"{version}\"\nentry = {:?}\n\
                 [[exports]]\nname = \"kv\"\n\
                 [limits]\nstart_deadline = \"2s\"\nstop_deadline = \"2s\"\n\
                 [rollout]\nstable_after = \"300ms\"\n\
                 [config]\nmax_value_bytes = {max}\n",
                artifact("kv").display().to_string()
            ),
        )
        .unwrap();
        dir
    };
    let kv1 = kv("1.0.0", 1024);
    let kv2 = kv("2.0.0", 2048);
    assert!(
        stdout(&d.ctl_ok(&["deploy", kv1.to_str().unwrap(), "--wait"]))
            .ends_with("installed kv 1.0.0 (revision 1)\n")
    );
    let mut g = Web {
        replicas: 2,
        import_kv: true,
        ..Web::greeter("1.0.0", "hi")
    };
    first_deploy(&d, &mut g);
    let wired = |s: &Value| {
        s["imports"]
            == json!([{"name": "kv", "version": 1, "state": "wired", "exporter": "kv", "reason": null}])
    };
    d.wait_status("web", "wired to kv", wired);
    let greeters = replica_pids(&status(&d, "web"));
    poll_until("a kv call through greeter", EVERY, || {
        match load::get(addr(g.port), "/kv/put/x/y") {
            Ok((200, _)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // Puts and gets of the key just put; kv's state is per process, so a
    // get may find nothing (404) on the other instance: any other status
    // than 200/404 (502, 503, 504: the call failed) is a failure, and so is
    // a put that is not 200.
    let load = Load::start(
        addr(g.port),
        4,
        Arc::new(|c, n| {
            if n % 2 == 0 {
                format!("/kv/put/c{c}n{n}/v{n}")
            } else {
                format!("/kv/get/c{c}n{}", n - 1)
            }
        }),
        Arc::new(|path, st| st == 200 || (st == 404 && path.starts_with("/kv/get/"))),
    );
    for (dir, revision, version) in [(&kv2, 2, "2.0.0"), (&kv1, 1, "1.0.0")] {
        let old = replica_pids(&status(&d, "kv"));
        let out = d.ctl(&["deploy", dir.to_str().unwrap(), "--wait"]);
        assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
        assert!(
            stdout(&out).ends_with(&format!(
                "kv: rollout of revision {revision} ({version}) completed\n"
            )),
            "{}",
            stdout(&out)
        );
        all_running(&d, "kv", 1, revision);
        assert_reaped(&old, "old kv");
        d.wait_status("web", "wired to the new kv", wired);
    }
    let report = load.stop();
    report.assert_no_failures("greeter's kv calls during two kv deploys");
    // A value found is the one put.
    for r in &report.records {
        if let (Some(key), Ok((200, body))) = (r.path.strip_prefix("/kv/get/"), &r.outcome) {
            let n = key.split_once('n').unwrap().1;
            assert_eq!(*body, format!("v{n}"), "{r:?}");
        }
    }
    // The importer was never restarted.
    let s = status(&d, "web");
    assert_eq!(replica_pids(&s), greeters);
    assert_eq!(s["restarts"], 0);
    assert_no_stray_workers(&d);
    let rows = history_rows(&d, "kv");
    assert_eq!(
        rows,
        vec![
            (2, "2.0.0".into(), "superseded".into()),
            (1, "1.0.0".into(), "active".into())
        ]
    );
}

#[test]
fn rollback_history_and_canary_pause_resume_abort() {
    let d = daemon();
    let web = |v: &str, g: &str, t: &str| Web {
        trailer: Some(t.into()),
        ..Web::greeter(v, g)
    };
    let mut a = web("1.0.0", "a", "a");
    first_deploy(&d, &mut a);
    let port = a.port;
    let at = |w: Web| Web { port, ..w };
    let b = at(web("2.0.0", "b", "b"));
    let c = at(web("3.0.0", "c", "c"));
    for (w, rev) in [(&b, 2), (&c, 3)] {
        let dir = w.write(d.dir.path());
        let out = d.ctl_ok(&["deploy", dir.to_str().unwrap(), "--wait"]);
        assert!(
            stdout(&out).ends_with(&format!(
                "web: rollout of revision {rev} ({}) completed\n",
                w.version
            )),
            "{}",
            stdout(&out)
        );
        all_running(&d, "web", 3, rev);
    }
    assert_serves_only(&c, 6);
    let rows = history_rows(&d, "web");
    assert_eq!(
        rows,
        vec![
            (3, "3.0.0".into(), "active".into()),
            (2, "2.0.0".into(), "superseded".into()),
            (1, "1.0.0".into(), "superseded".into()),
        ]
    );
    let h = history(&d, "web");
    for (w, rev) in [(&a, 1), (&b, 2), (&c, 3)] {
        let r = h.iter().find(|r| r["revision"] == rev).unwrap();
        assert_eq!(r["artifact_sha256"], w.sha256(d.dir.path()), "{r}");
        assert!(d
            .state
            .join("artifacts")
            .join(format!("{}.so", w.sha256(d.dir.path())))
            .exists());
    }

    // Rollback, default: the revision before the active one.
    let old = replica_pids(&status(&d, "web"));
    let out = d.ctl_ok(&["rollback", "web", "--wait"]);
    assert!(
        stdout(&out).ends_with("web: rollout of revision 2 (2.0.0) completed\n"),
        "{}",
        stdout(&out)
    );
    all_running(&d, "web", 3, 2);
    assert_serves_only(&b, 6);
    assert_reaped(&old, "revision 3");
    let h = history(&d, "web");
    assert_eq!(outcome(&h, 2).0, "active");
    assert_eq!(outcome(&h, 3).0, "superseded");
    assert_eq!(outcome(&h, 1).0, "superseded");

    // Rollback --to 1, from the stored artifact: its source is gone.
    let a_sha = a.sha256(d.dir.path());
    std::fs::remove_dir_all(a.dir(d.dir.path())).unwrap();
    let out = d.ctl_ok(&["rollback", "web", "--to", "1", "--wait"]);
    assert!(
        stdout(&out).ends_with("web: rollout of revision 1 (1.0.0) completed\n"),
        "{}",
        stdout(&out)
    );
    let s = all_running(&d, "web", 3, 1);
    assert_eq!(s["artifact_sha256"], a_sha);
    assert_serves_only(&a, 6);
    let out = d.ctl(&["rollback", "web", "--to", "99"]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let out = d.ctl_ok(&["rollback", "web", "--to", "1", "--wait"]);
    assert_eq!(
        stdout(&out),
        "web: unchanged (revision 1 is already active)\n"
    );
    let rows = history_rows(&d, "web");
    assert_eq!(
        rows,
        vec![
            (3, "3.0.0".into(), "superseded".into()),
            (2, "2.0.0".into(), "superseded".into()),
            (1, "1.0.0".into(), "active".into()),
        ]
    );

    // Canary: one new replica beside all the old ones, held.
    let old = replica_pids(&all_running(&d, "web", 3, 1));
    let dd = at(web("4.0.0", "d", "d"));
    let d_dir = dd.write(d.dir.path());
    let out = d.ctl_ok(&["deploy", d_dir.to_str().unwrap(), "--pause-after", "1"]);
    assert!(
        stdout(&out).starts_with("web: revision 4 (4.0.0) rolling out"),
        "{}",
        stdout(&out)
    );
    let s = wait_rollout(&d, "web", "the canary paused", |r| {
        r["phase"] == "paused" && r["new_ready"] == 1
    });
    let r = &s["rollout"];
    assert_eq!(
        (&r["new_replicas"], &r["old_replicas"]),
        (&json!(1), &json!(3)),
        "{s}"
    );
    assert_eq!(r["pause_after"], 1);
    let by_rev = |s: &Value, rev: u64| -> Vec<i32> {
        s["replicas"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|x| x["revision"] == rev && x["state"] == "running")
            .filter_map(|x| x["pid"].as_i64().map(|p| p as i32))
            .collect()
    };
    assert_eq!(by_rev(&s, 1), old, "{s}");
    assert_eq!(by_rev(&s, 4).len(), 1, "{s}");
    assert_eq!(s["revision"], 1);
    // Both revisions answer on the one port; the canary does too.
    poll_until(
        "an answer from the canary",
        Duration::ZERO,
        || match load::get(addr(port), "/hello/probe") {
            Ok((200, body)) if body.starts_with(&dd.hello_prefix("probe")) => Ok(()),
            Ok((200, body)) if body.starts_with(&a.hello_prefix("probe")) => Err(body),
            other => panic!("while paused: {other:?}"),
        },
    );
    // Paused, the CLI says so; another release is refused meanwhile.
    let text = stdout(&d.ctl_ok(&["list"]));
    // new READY/LAUNCHED, old: one canary launched and ready.
    assert!(text.contains("→ rev 4 (paused, new 1/1, old 3)"), "{text}");
    let text = stdout(&d.ctl_ok(&["status", "web"]));
    assert!(text.contains("phase: paused"), "{text}");
    let out = d.ctl(&["deploy", d_dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    let out = d.ctl(&["rollback", "web"]);
    assert_eq!(out.status.code(), Some(5), "{}", stderr(&out));
    assert_eq!(outcome(&history(&d, "web"), 4).0, "rolling-out");

    let out = d.ctl_ok(&["rollout", "resume", "web"]);
    assert!(stdout(&out).starts_with("web: "), "{}", stdout(&out));
    all_running(&d, "web", 3, 4);
    assert_reaped(&old, "revision 1 after the resume");
    assert_serves_only(&dd, 6);
    assert_eq!(outcome(&history(&d, "web"), 4).0, "active");

    // Canary aborted while paused: the old revision stays, untouched.
    let old = replica_pids(&status(&d, "web"));
    let e = at(web("5.0.0", "e", "e"));
    let e_dir = e.write(d.dir.path());
    d.ctl_ok(&["deploy", e_dir.to_str().unwrap(), "--pause-after", "1"]);
    let s = wait_rollout(&d, "web", "the second canary paused", |r| {
        r["phase"] == "paused" && r["new_ready"] == 1
    });
    let canary = by_rev(&s, 5);
    assert_eq!(canary.len(), 1, "{s}");
    let out = d.ctl_ok(&["rollout", "abort", "web"]);
    assert_eq!(
        stdout(&out),
        "web: the rollout has ended; revision 4 (4.0.0) is active\n"
    );
    let s = all_running(&d, "web", 3, 4);
    assert_eq!(replica_pids(&s), old);
    assert_reaped(&canary, "the aborted canary");
    assert_serves_only(&dd, 6);
    let h = history(&d, "web");
    assert_eq!(
        outcome(&h, 5),
        ("aborted".into(), Some("aborted by request".into()))
    );
    let rows = history_rows(&d, "web");
    assert_eq!(
        rows[0],
        (5, "5.0.0".into(), "aborted: aborted by request".into())
    );
    assert_eq!(rows[1], (4, "4.0.0".into(), "active".into()));
    // Nothing left to act on.
    for action in ["resume", "abort", "pause"] {
        let out = d.ctl(&["rollout", action, "web"]);
        assert_eq!(out.status.code(), Some(4), "{action}: {}", stderr(&out));
    }
    assert_no_stray_workers(&d);
}

/// Where a round of [`kill_9_during_rollouts_keeps_one_committed_revision`]
/// kills emberd (always once the rollout's revision is on disk).
#[derive(Debug, Clone, Copy, PartialEq)]
enum KillAt {
    /// As soon as the revision is on disk.
    Recorded,
    /// This long after that (a fault injected at an arbitrary point, not a
    /// wait for anything).
    After(u64),
    /// While new replicas start (`fixture-never-ready` never gets ready).
    Progressing,
    /// Paused after a canary (`pause_after 1`).
    Paused,
    /// Draining (the `slow` module's old replicas ignore the stop request
    /// until their stop deadline).
    Draining,
    /// Stabilizing (the revision's `stable_after` is 60 minutes).
    Stabilizing,
    /// After the rollout completed.
    Completed,
}

#[test]
fn kill_9_during_rollouts_keeps_one_committed_revision() {
    // Workers of a killed emberd that are handed to this process are
    // reaped here (PID 1 in the test container may not reap).
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut d = daemon();
    let mut web = Web {
        trailer: Some("web 0".into()),
        ..Web::greeter("1.0.0", "g0")
    };
    first_deploy(&d, &mut web);
    // A module whose workers take their time to stop: its rollouts drain
    // until the old replicas' stop deadline.
    let mut slow = Web {
        name: "slow",
        krate: "fixture-ignores-stop",
        replicas: 2,
        trailer: Some("slow 0".into()),
        ..Web::greeter("1.0.0", "-")
    };
    first_deploy(&d, &mut slow);
    // Every revision deployed, and the committed one of each module.
    let mut known: BTreeMap<(&str, u64), Web> =
        BTreeMap::from([(("web", 1), web.clone()), (("slow", 1), slow.clone())]);
    let mut committed: BTreeMap<&str, u64> = BTreeMap::from([("web", 1), ("slow", 1)]);
    let mut aborted: BTreeSet<(&str, u64)> = BTreeSet::new();
    let rounds = [
        KillAt::Recorded,
        KillAt::Progressing,
        KillAt::After(5),
        KillAt::Paused,
        KillAt::Draining,
        KillAt::After(40),
        KillAt::Stabilizing,
        KillAt::After(120),
        KillAt::Completed,
        KillAt::Draining,
        KillAt::After(0),
    ];
    let mut seen_at_kill = Vec::new();
    for (round, at) in rounds.into_iter().enumerate() {
        let n = round + 1;
        let base = if at == KillAt::Draining { &slow } else { &web };
        let name = base.name;
        let w = Web {
            version: format!("1.{n}.0"),
            greeting: format!("g{n}"),
            trailer: Some(format!("{name} {n}")),
            krate: match at {
                KillAt::Progressing => "fixture-never-ready",
                _ => base.krate,
            },
            stable_after: if at == KillAt::Stabilizing {
                "60m"
            } else {
                "300ms"
            },
            ..base.clone()
        };
        let dir = w.write(d.dir.path());
        let mut params = json!({ "path": dir.to_str().unwrap() });
        if at == KillAt::Paused {
            params["pause_after"] = json!(1);
        }
        let mut raw = Raw::connect(&d.socket);
        let r = raw.call("io.ember.Supervisor.Deploy", params.clone());
        let p = &r["parameters"];
        assert_eq!(p["outcome"], "started", "round {round}: {r}");
        let revision = p["revision"].as_u64().unwrap();
        assert!(!known.contains_key(&(name, revision)), "round {round}: {r}");
        known.insert((name, revision), w.clone());
        // The rollout's revision on disk first: a kill before that loses
        // the acknowledged revision altogether (see
        // `a_deploy_acknowledged_as_started_is_in_history_after_kill_9`).
        wait_recorded(&d, name, revision);
        let mut raw_status = || {
            raw.call("io.ember.Supervisor.Status", json!({ "name": name }))["parameters"]["status"]
                .clone()
        };
        let mut wait_phase = |phase: &str| {
            poll_until(phase, Duration::from_millis(5), || {
                let s = raw_status();
                let r = &s["rollout"];
                let there = r["phase"] == phase
                    && match phase {
                        "progressing" => r["new_replicas"].as_u64() > Some(0),
                        "draining" => r["old_replicas"].as_u64() > Some(0),
                        _ => true,
                    };
                if there {
                    Ok(())
                } else {
                    Err(s["rollout"].to_string())
                }
            })
        };
        match at {
            KillAt::Recorded => {}
            // Not a wait for a condition: the kill lands wherever the
            // rollout happens to be this long after the call (any phase is
            // a valid outcome; the checks below hold for each).
            KillAt::After(ms) => std::thread::sleep(Duration::from_millis(ms)),
            KillAt::Progressing => wait_phase("progressing"),
            KillAt::Paused => wait_phase("paused"),
            KillAt::Draining => wait_phase("draining"),
            KillAt::Stabilizing => wait_phase("stabilizing"),
            KillAt::Completed => {
                poll_until("the rollout completed", EVERY, || {
                    let s = raw_status();
                    if s["rollout"].is_null() && s["revision"] == revision {
                        Ok(())
                    } else {
                        Err(s.to_string())
                    }
                });
            }
        }
        // Where the rollout was just before the kill (for the record).
        let last = raw_status();
        seen_at_kill.push(format!(
            "{at:?} ({name} revision {revision}): {}",
            last["rollout"]["phase"].as_str().unwrap_or("no rollout")
        ));
        drop(raw);

        // kill -9 of emberd: every process it started dies with it.
        kill_9(&mut d);

        // Restarted on the same state: each module on one committed
        // revision, the interrupted one aborted.
        d.spawn(&[]);
        for module in ["web", "slow"] {
            let h = history(&d, module);
            let active: Vec<u64> = h
                .iter()
                .filter(|r| r["outcome"] == "active")
                .map(|r| r["revision"].as_u64().unwrap())
                .collect();
            assert_eq!(active.len(), 1, "round {round} ({at:?}) {module}: {h:?}");
            assert!(
                h.iter().all(|r| r["outcome"] != "rolling-out"),
                "round {round} ({at:?}) {module}: {h:?}"
            );
            if module == name {
                let (o, reason) = outcome(&h, revision);
                match at {
                    KillAt::Completed => assert_eq!(o, "active", "round {round}: {h:?}"),
                    KillAt::Progressing
                    | KillAt::Paused
                    | KillAt::Draining
                    | KillAt::Stabilizing => assert_eq!(
                        (o.as_str(), reason.as_deref()),
                        ("aborted", Some("emberd restarted during its rollout")),
                        "round {round} ({at:?}): {h:?}"
                    ),
                    // Killed after its commit reached the disk, it is the
                    // active one.
                    KillAt::Recorded | KillAt::After(_) => assert!(
                        o == "active"
                            || (o == "aborted"
                                && reason.as_deref()
                                    == Some("emberd restarted during its rollout")),
                        "round {round} ({at:?}): {o} {reason:?}: {h:?}"
                    ),
                }
                if o == "aborted" {
                    aborted.insert((name, revision));
                }
            } else {
                assert_eq!(
                    active[0], committed[module],
                    "round {round} {module}: {h:?}"
                );
            }
            committed.insert(module, active[0]);
            // Earlier aborts stay aborted; every revision listed has its
            // artifact in the state directory.
            for r in &h {
                let rev = r["revision"].as_u64().unwrap();
                if aborted.contains(&(module, rev)) {
                    assert_eq!(r["outcome"], "aborted", "round {round}: {h:?}");
                }
                let sha = r["artifact_sha256"].as_str().unwrap();
                assert_eq!(
                    sha,
                    known[&(module, rev)].sha256(d.dir.path()),
                    "round {round}: {r}"
                );
                assert!(
                    d.state.join("artifacts").join(format!("{sha}.so")).exists(),
                    "round {round}: the artifact of {module} revision {rev} is missing"
                );
            }
            // Running the committed revision only, in fresh workers.
            let now = committed[module];
            let w = &known[&(module, now)];
            let s = all_running(&d, module, w.replicas, now);
            assert_eq!(s["version"], w.version.as_str());
        }
        web = known[&("web", committed["web"])].clone();
        slow = known[&("slow", committed["slow"])].clone();
        wait_serving(&web, 8);
        assert_no_stray_workers(&d);
        let list = d.ctl_json(&["list"]);
        for m in list["modules"].as_array().unwrap() {
            let name = m["name"].as_str().unwrap();
            assert_eq!(m["revision"], committed[name], "{list}");
        }
        assert_eq!(list["modules"].as_array().unwrap().len(), 2, "{list}");
    }
    eprintln!("kill points: {seen_at_kill:#?}");
    // History newest first.
    let h = history(&d, "web");
    let revs: Vec<u64> = h.iter().map(|r| r["revision"].as_u64().unwrap()).collect();
    let mut sorted = revs.clone();
    sorted.sort_by(|a, b| b.cmp(a));
    assert_eq!(revs, sorted, "{h:?}");
    // The old workers of `slow` ignore stop requests: end it here, where
    // its stop deadline is waited for, not in the daemon's drop.
    d.ctl_ok(&["uninstall", "slow"]);
}

/// A `Deploy` that replied `started` names a revision the caller will
/// look for: killed right after that reply, emberd must come back with
/// that revision in the history (aborted, "emberd restarted during its
/// rollout"), never forget it and hand its number to other content.
#[test]
fn a_deploy_acknowledged_as_started_is_in_history_after_kill_9() {
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut d = daemon();
    let mut a = Web {
        replicas: 1,
        ..Web::greeter("1.0.0", "hi")
    };
    first_deploy(&d, &mut a);
    for round in 1..=3 {
        let w = Web {
            version: format!("1.{round}.0"),
            greeting: format!("r{round}"),
            ..a.clone()
        };
        let dir = w.write(d.dir.path());
        let mut raw = Raw::connect(&d.socket);
        let r = raw.call(
            "io.ember.Supervisor.Deploy",
            json!({ "path": dir.to_str().unwrap() }),
        );
        assert_eq!(r["parameters"]["outcome"], "started", "{r}");
        let revision = r["parameters"]["revision"].as_u64().unwrap();
        kill_9(&mut d);
        d.spawn(&[]);
        let h = history(&d, "web");
        let entry = h.iter().find(|r| r["revision"] == revision);
        assert!(
            entry.is_some_and(|e| e["version"] == w.version.as_str()
                && e["outcome"] == "aborted"
                && e["reason"] == "emberd restarted during its rollout"),
            "round {round}: Deploy replied `started` for revision {revision} ({}), but after \
             kill -9 and a restart the history is {h:?}",
            w.version
        );
        all_running(&d, "web", 1, 1);
        wait_serving(&a, 4);
    }
}

#[test]
fn rolling_deploys_with_max_surge_1_under_load() {
    let d = daemon();
    let mut a = Web::greeter("1.0.0", "hi");
    first_deploy(&d, &mut a);
    let b = Web {
        version: "2.0.0".into(),
        greeting: "yo".into(),
        ..a.clone()
    };
    let b_dir = b.write(d.dir.path());
    let a_dir = a.dir(d.dir.path());
    let load = Load::get(addr(a.port), 4, "/hello/load");
    let mut t_done = Vec::new();
    for (to, dir, revision, unavailable) in [(&b, &b_dir, 2, "0"), (&a, &a_dir, 1, "1")] {
        let old = replica_pids(&status(&d, "web"));
        let (code, replies, err) = deploy_wait_json(
            &d,
            &[
                dir.to_str().unwrap(),
                "--strategy",
                "rolling",
                "--max-surge",
                "1",
                "--max-unavailable",
                unavailable,
            ],
        );
        assert_eq!(code, Some(0), "{err} {replies:?}");
        let last = replies.last().unwrap();
        assert_eq!(
            (&last["outcome"], &last["revision"]),
            (&json!("completed"), &json!(revision)),
            "{last}"
        );
        // Never more than replicas + max_surge workers of the two revisions.
        let mut phases = Vec::new();
        for r in replies
            .iter()
            .filter_map(|r| r["module"]["rollout"].as_object())
        {
            assert_eq!(r["strategy"], "rolling");
            assert_eq!(r["max_surge"], 1);
            let alive = r["old_replicas"].as_u64().unwrap() + r["new_replicas"].as_u64().unwrap();
            assert!(alive <= 4, "{r:?}");
            phases.push(r["phase"].as_str().unwrap().to_owned());
        }
        assert!(phases.iter().any(|p| p == "progressing"), "{phases:?}");
        assert_eq!(phases.last().map(String::as_str), Some("stabilizing"));
        assert_serves_only(to, 10);
        all_running(&d, "web", 3, revision);
        assert_reaped(&old, "old revision");
        t_done.push((Instant::now(), to.hello_prefix("load")));
    }
    let report = load.stop();
    report.assert_no_failures("clients during two rolling deploys");
    let (t, want) = t_done.last().unwrap();
    assert!(report
        .started_after(*t)
        .all(|r| r.body().unwrap().starts_with(want.as_str())));
    assert_no_stray_workers(&d);
    let rows = history_rows(&d, "web");
    assert_eq!(
        rows,
        vec![
            (2, "2.0.0".into(), "superseded".into()),
            (1, "1.0.0".into(), "active".into())
        ]
    );
}

#[test]
fn an_abort_while_draining_brings_the_old_replicas_back() {
    let d = daemon();
    // Old replicas that take their stop deadline to exit: the rollout
    // stays in `draining` long enough to abort it there.
    let mut slow = Web {
        name: "slow",
        krate: "fixture-ignores-stop",
        replicas: 2,
        trailer: Some("drain 0".into()),
        ..Web::greeter("1.0.0", "-")
    };
    first_deploy(&d, &mut slow);
    let v2 = Web {
        version: "2.0.0".into(),
        trailer: Some("drain 1".into()),
        ..slow.clone()
    };
    let dir = v2.write(d.dir.path());
    d.ctl_ok(&["deploy", dir.to_str().unwrap()]);
    wait_rollout(&d, "slow", "draining", |r| r["phase"] == "draining");
    // Pausing is refused there (the old replicas are already stopping).
    let out = d.ctl(&["rollout", "pause", "slow"]);
    assert_eq!(out.status.code(), Some(4), "{}", stderr(&out));
    assert!(stderr(&out).contains("draining"), "{}", stderr(&out));
    d.ctl_ok(&["rollout", "abort", "slow"]);
    // The old replicas exit at their stop deadline and start again: the
    // module ends on revision 1 with both replicas running. Meanwhile the
    // new replicas serve: at no moment is no replica running.
    poll_until("revision 1 running again", EVERY, || {
        let s = status(&d, "slow");
        let reps = s["replicas"].as_array().unwrap();
        let running = reps.iter().filter(|r| r["state"] == "running").count();
        assert!(running >= 1, "no replica running during the abort: {s}");
        let back = s["revision"] == 1
            && s["rollout"].is_null()
            && reps.len() == 2
            && reps
                .iter()
                .all(|r| r["state"] == "running" && r["revision"] == 1);
        if back {
            Ok(())
        } else {
            Err(format!("{s}"))
        }
    });
    assert_eq!(outcome(&history(&d, "slow"), 2).0, "aborted");
    assert_no_stray_workers(&d);
    d.ctl_ok(&["uninstall", "slow"]);
}

#[test]
fn deploys_may_change_the_replica_count_and_rolling_replaces_unready_replicas() {
    let d = daemon();
    let mut web = Web::greeter("1.0.0", "g1");
    first_deploy(&d, &mut web);
    // 3 replicas → 1 (surge), then → 2 (rolling).
    let one = Web {
        version: "2.0.0".into(),
        greeting: "g2".into(),
        replicas: 1,
        ..web.clone()
    };
    let dir = one.write(d.dir.path());
    let (code, _, err) = deploy_wait_json(&d, &[dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    all_running(&d, "web", 1, 2);
    let two = Web {
        version: "3.0.0".into(),
        greeting: "g3".into(),
        replicas: 2,
        ..web.clone()
    };
    let dir = two.write(d.dir.path());
    let (code, _, err) = deploy_wait_json(&d, &[dir.to_str().unwrap(), "--strategy", "rolling"]);
    assert_eq!(code, Some(0), "{err}");
    all_running(&d, "web", 2, 3);
    assert_serves_only(&two, 8);

    // A module whose replicas never become ready (they crash-loop at their
    // start deadline): a rolling release with max_unavailable 0 replaces
    // them anyway, since stopping an unready replica costs no
    // availability.
    let mut broken = Web {
        name: "nr",
        krate: "fixture-never-ready",
        replicas: 2,
        port: free_port(),
        ..Web::greeter("1.0.0", "-")
    };
    let dir = broken.write(d.dir.path());
    d.ctl_ok(&["deploy", dir.to_str().unwrap()]);
    broken.krate = "greeter";
    broken.version = "1.1.0".into();
    broken.greeting = "fixed".into();
    let dir = broken.write(d.dir.path());
    let (code, _, err) = deploy_wait_json(
        &d,
        &[
            dir.to_str().unwrap(),
            "--strategy",
            "rolling",
            "--max-surge",
            "1",
        ],
    );
    assert_eq!(code, Some(0), "{err}");
    all_running(&d, "nr", 2, 2);
    assert_serves_only(&broken, 4);
    for m in ["web", "nr"] {
        d.ctl_ok(&["uninstall", m]);
    }
}
