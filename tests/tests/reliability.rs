//! The reliability suite: a real `emberd` killed with SIGKILL at random
//! points of install, uninstall, deploy and restart, then restarted on the
//! same state; a thousand install/uninstall cycles with its resources
//! counted; hostile bytes on its control socket from many connections.
//!
//! Random choices come from a seeded generator: the seed is printed, and
//! `EMBER_RELIABILITY_SEED=N` replays a run. CI runs the short version;
//! `EMBER_RELIABILITY_LONG=1` runs hundreds of kills and thousands of
//! cycles. Waits are polls with a deadline ([`ember_tests::PATIENCE`]);
//! nothing asserts how long anything took.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_tests::chaos::{cgroup_children, cgroup_parents, long_mode, Rng};
use ember_tests::daemon::*;
use ember_tests::procs::{children_of, fd_count, reap_orphans, rss_kib, zygote_family};
use ember_tests::{artifact, poll_until, PATIENCE};
use serde_json::{json, Value};

const EVERY: Duration = Duration::from_millis(20);

/// A module directory `NAME-VERSION` running the `hello` example with two
/// replicas, committed 100 ms after a deploy takes over.
fn hello_dir(parent: &Path, name: &str, version: &str) -> PathBuf {
    let d = parent.join(format!("{name}-{version}"));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(
        d.join("module.toml"),
        format!(
            "name = \"{name}\"\nversion = \"{version}\"\nentry = {:?}\nreplicas = 2\n\
             [limits]\nstart_deadline = \"5s\"\nstop_deadline = \"2s\"\n\
             [rollout]\nstable_after = \"100ms\"\n",
            artifact("hello").display().to_string()
        ),
    )
    .unwrap();
    d
}

/// A Varlink client that survives its server being killed: every reply to
/// one call (following `continues`) until the last, EOF or a reset.
struct Client {
    s: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(path: &Path) -> std::io::Result<Self> {
        let s = UnixStream::connect(path)?;
        s.set_read_timeout(Some(PATIENCE))?;
        s.set_write_timeout(Some(PATIENCE))?;
        Ok(Self { s, buf: Vec::new() })
    }

    fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == 0) {
                let frame: Vec<u8> = self.buf.drain(..=i).collect();
                return Some(serde_json::from_slice(&frame[..i]).expect("a JSON reply"));
            }
            let mut tmp = [0u8; 16384];
            match self.s.read(&mut tmp) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading a reply: {e}"),
            }
        }
    }

    /// Sends one call and collects its replies: (replies, whether the last
    /// one ended the call).
    fn call(&mut self, method: &str, params: Value, more: bool) -> (Vec<Value>, bool) {
        let mut call =
            json!({ "method": format!("io.ember.Supervisor.{method}"), "parameters": params });
        if more {
            call["more"] = json!(true);
        }
        let mut bytes = serde_json::to_vec(&call).unwrap();
        bytes.push(0);
        if self.s.write_all(&bytes).is_err() {
            return (Vec::new(), false);
        }
        let mut replies = Vec::new();
        while let Some(r) = self.next() {
            let last = r["continues"] != true;
            replies.push(r);
            if last {
                return (replies, true);
            }
        }
        (replies, false)
    }
}

// ---------------------------------------------------------------------------
// kill -9 at random points

/// What a module that was acknowledged runs.
#[derive(Debug, Clone, PartialEq)]
struct Expect {
    revision: u64,
    version: String,
}

/// The operation a round interrupts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Op {
    Install,
    Uninstall,
    Deploy,
    /// emberd killed while it starts and restores its modules.
    Restart,
    /// emberd killed while it restarts a module whose worker was killed.
    WorkerRestart,
}

/// An operation that was cut short: it may or may not have taken effect.
#[derive(Debug, Clone)]
enum Unsure {
    Installed(String),
    Uninstalled(String),
    Deployed { name: String, version: String },
}

/// kill -9 of emberd; every process it had (`seen`, plus its zygote's
/// family) must die with it.
fn kill_9(d: &mut Daemon) -> i32 {
    let pid = d.pid();
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    pid
}

/// Waits until no process of the emberd `old` is left: `seen` (its children
/// before the kill) and any process still naming it as its zygote's parent.
fn assert_no_orphans(old: i32, seen: &BTreeSet<i32>, round: usize) {
    poll_until(
        &format!("round {round}: no process of the killed emberd {old}"),
        EVERY,
        || {
            reap_orphans();
            let mut left: BTreeSet<i32> = zygote_family(old).into_iter().collect();
            left.extend(seen.iter().copied().filter(|&p| !dead(p)));
            if left.is_empty() {
                Ok(())
            } else {
                Err(format!("left running: {left:?}"))
            }
        },
    );
}

/// emberd's processes now: its children (zygote and workers) and its
/// zygote's family.
fn family(emberd: i32) -> BTreeSet<i32> {
    children_of(emberd)
        .into_iter()
        .chain(zygote_family(emberd))
        .collect()
}

/// What the restarted emberd runs once settled: name → (revision, version)
/// with every replica running that revision, no rollout. Also checks the
/// state directory, emberd's children and its cgroups against it.
fn settled(d: &Daemon, round: usize) -> BTreeMap<String, Expect> {
    let modules = poll_until(
        &format!("round {round}: every module running"),
        EVERY,
        || {
            let list = d.ctl_json(&["list"]);
            let mut out = BTreeMap::new();
            for m in list["modules"].as_array().unwrap() {
                let name = m["name"].as_str().unwrap().to_owned();
                let s = d.ctl_json(&["status", &name])["status"].clone();
                let rev = s["revision"].as_u64().unwrap();
                let reps = s["replicas"].as_array().unwrap();
                let ok = s["rollout"].is_null()
                    && reps.len() == 2
                    && reps
                        .iter()
                        .all(|r| r["state"] == "running" && r["revision"] == rev);
                if !ok {
                    return Err(s.to_string());
                }
                out.insert(name, s);
            }
            Ok(out)
        },
    );
    // The state on disk says the same; nothing stale is left in it.
    let desired: Value = serde_json::from_slice(
        &std::fs::read(d.state.join("desired.json"))
            .unwrap_or_else(|_| b"{\"modules\":{}}".to_vec()),
    )
    .unwrap();
    let on_disk: BTreeMap<String, u64> = desired["modules"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v["revision"].as_u64().unwrap()))
        .collect();
    let running: BTreeMap<String, u64> = modules
        .iter()
        .map(|(k, s)| (k.clone(), s["revision"].as_u64().unwrap()))
        .collect();
    assert_eq!(on_disk, running, "round {round}: desired.json vs what runs");
    let referenced: BTreeSet<String> = desired["modules"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|m| {
            std::iter::once(m["artifact_sha256"].clone()).chain(
                m["revisions"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|r| r["artifact_sha256"].clone()),
            )
        })
        .map(|h| format!("{}.so", h.as_str().unwrap()))
        .collect();
    let files = |sub: &str| -> BTreeSet<String> {
        std::fs::read_dir(d.state.join(sub))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        files("artifacts"),
        referenced,
        "round {round}: stored artifacts"
    );
    let logs = files("logs");
    let stale_logs: Vec<&String> = logs
        .iter()
        .filter(|l| !running.contains_key(l.trim_end_matches(".log")))
        .collect();
    assert!(
        stale_logs.is_empty(),
        "round {round}: logs of modules not installed: {stale_logs:?}"
    );
    for (name, s) in &modules {
        let h = d.ctl_json(&["history", name])["revisions"].clone();
        assert!(
            h.as_array()
                .unwrap()
                .iter()
                .all(|r| r["outcome"] != "rolling-out"),
            "round {round}: {name} {h}"
        );
        assert!(
            d.state
                .join("artifacts")
                .join(format!("{}.so", s["artifact_sha256"].as_str().unwrap()))
                .is_file(),
            "round {round}: {name}'s artifact"
        );
    }
    // emberd's children and cgroups: exactly its zygote, its idle workers
    // and the replicas it reports.
    let pid = d.pid();
    poll_until(
        &format!("round {round}: only expected workers and cgroups"),
        EVERY,
        || {
            let zygote = d.ctl_json(&["health"])["zygote_pid"].as_i64().unwrap() as i32;
            let idle: BTreeSet<i32> = d.ctl_json(&["pool"])["pool"]["idle_pids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_i64().unwrap() as i32)
                .collect();
            let mut pids: BTreeSet<i32> = idle.clone();
            pids.insert(zygote);
            let mut groups: BTreeSet<String> = idle.iter().map(|p| format!("idle.{p}")).collect();
            for name in modules.keys() {
                let s = d.ctl_json(&["status", name])["status"].clone();
                for r in s["replicas"].as_array().unwrap() {
                    pids.insert(r["pid"].as_i64().unwrap() as i32);
                    for g in r["cgroups"].as_array().unwrap() {
                        groups.insert(
                            Path::new(g.as_str().unwrap())
                                .file_name()
                                .unwrap()
                                .to_string_lossy()
                                .into_owned(),
                        );
                    }
                }
            }
            let children: BTreeSet<i32> = children_of(pid).into_iter().collect();
            let have = cgroup_children(pid);
            if children == pids && have == groups {
                Ok(())
            } else {
                Err(format!(
                "children {children:?}, expected {pids:?}; cgroups {have:?}, expected {groups:?}"
            ))
            }
        },
    );
    modules
        .into_iter()
        .map(|(k, s)| {
            (
                k,
                Expect {
                    revision: s["revision"].as_u64().unwrap(),
                    version: s["version"].as_str().unwrap().to_owned(),
                },
            )
        })
        .collect()
}

#[test]
fn kill_9_at_random_points_restores_the_desired_state() {
    // Workers of a killed emberd handed to this process are reaped here.
    nix::sys::prctl::set_child_subreaper(true).unwrap();
    let mut rng = Rng::from_env("kill_9_at_random_points_restores_the_desired_state");
    let rounds = if long_mode() { 300 } else { 30 };
    let mut d = Daemon::start(&format!("[pool]\nmin_idle = 1\nmax_idle = 2\n{FAST}"));
    const NAMES: [&str; 3] = ["ra", "rb", "rc"];
    let mut acked: BTreeMap<String, Expect> = BTreeMap::new();
    let mut versions = 0u32;
    let mut tally: BTreeMap<String, usize> = BTreeMap::new();
    // How long each operation takes, in ms.
    let mut estimate: BTreeMap<Op, u64> = BTreeMap::from([
        (Op::Install, 300),
        (Op::Uninstall, 150),
        (Op::Deploy, 500),
        (Op::Restart, 200),
        (Op::WorkerRestart, 150),
    ]);
    for round in 0..rounds {
        let installed: Vec<String> = acked.keys().cloned().collect();
        let free: Vec<&str> = NAMES
            .iter()
            .copied()
            .filter(|n| !acked.contains_key(*n))
            .collect();
        let op = loop {
            let op = *rng.pick(&[
                Op::Install,
                Op::Uninstall,
                Op::Deploy,
                Op::Restart,
                Op::WorkerRestart,
            ]);
            let possible = match op {
                Op::Install => !free.is_empty(),
                Op::Uninstall | Op::Deploy | Op::WorkerRestart => !installed.is_empty(),
                Op::Restart => true,
            };
            if possible {
                break op;
            }
        };
        let t0 = Instant::now();
        // Kill points spread over the operation's usual length: twice the
        // estimate, which follows what acknowledged operations took (and
        // grows while none is acknowledged, the machine being slower).
        let delay = Duration::from_millis(rng.below(2 * estimate[&op] + 1));
        let mut seen = family(d.pid());
        let mut killed = Vec::new();
        let socket = d.socket.clone();
        let (unsure, call) = match op {
            Op::Install => {
                let name = rng.pick(&free).to_string();
                let dir = hello_dir(d.dir.path(), &name, "1.0.0");
                let params = json!({ "path": dir.to_str().unwrap() });
                (
                    Some(Unsure::Installed(name)),
                    Some(("Install", params, false)),
                )
            }
            Op::Uninstall => {
                let name = rng.pick(&installed).clone();
                (
                    Some(Unsure::Uninstalled(name.clone())),
                    Some(("Uninstall", json!({ "name": name }), false)),
                )
            }
            Op::Deploy => {
                let name = rng.pick(&installed).clone();
                versions += 1;
                let version = format!("1.{versions}.0");
                let dir = hello_dir(d.dir.path(), &name, &version);
                let params = json!({ "path": dir.to_str().unwrap() });
                (
                    Some(Unsure::Deployed { name, version }),
                    Some(("Deploy", params, true)),
                )
            }
            Op::Restart => {
                // A settled emberd killed, started again and killed while
                // it restores its modules.
                killed.push(kill_9(&mut d));
                d.spawn_nowait(&[]);
                (None, None)
            }
            Op::WorkerRestart => {
                let name = rng.pick(&installed).clone();
                let s = d.ctl_json(&["status", &name])["status"].clone();
                let pids: Vec<i32> = s["replicas"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|r| r["pid"].as_i64().map(|p| p as i32))
                    .collect();
                let victim = *rng.pick(&pids);
                nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(victim),
                    nix::sys::signal::Signal::SIGKILL,
                )
                .unwrap();
                (None, None)
            }
        };
        let client = call.map(|(method, params, more)| {
            std::thread::spawn(move || {
                let t = Instant::now();
                let mut c = Client::connect(&socket).expect("connect");
                let r = c.call(method, params, more);
                (r, t.elapsed())
            })
        });
        // Not a wait for anything: the kill lands wherever the operation
        // (or emberd's start) happens to be.
        std::thread::sleep(delay);
        if op == Op::Restart {
            // The processes the starting emberd has by now.
            if let Some(c) = d.child.as_ref() {
                seen.extend(family(c.id() as i32));
            }
        } else {
            seen.extend(family(d.pid()));
        }
        killed.push(kill_9(&mut d));
        let replies = client.map(|c| {
            let (r, took) = c.join().unwrap();
            let e = estimate.get_mut(&op).unwrap();
            *e = if r.1 {
                (*e * 4 / 5).max(took.as_millis() as u64)
            } else {
                (*e * 3 / 2).min(5000)
            };
            r
        });
        // Started again at once, as a service manager would.
        d.spawn(&[]);
        for &old in &killed {
            assert_no_orphans(old, &seen, round);
            poll_until(
                &format!("round {round}: the cgroups of the killed emberd {old} removed"),
                EVERY,
                || match cgroup_parents(old) {
                    p if p.is_empty() => Ok(()),
                    p => Err(format!("{p:?}")),
                },
            );
        }
        // Acknowledged: the call's last reply arrived and was not an error.
        let ack = replies.as_ref().and_then(|(r, done)| {
            let last = r.last()?;
            (*done && last.get("error").is_none()).then(|| last["parameters"].clone())
        });
        let refused = replies.as_ref().and_then(|(r, done)| {
            r.last()
                .filter(|_| *done)
                .and_then(|l| l.get("error"))
                .cloned()
        });
        let now = settled(&d, round);
        let mut want = acked.clone();
        let outcome = match (&unsure, &ack) {
            (None, _) => "restart",
            (Some(_), Some(_)) => "acknowledged",
            (Some(_), None) if refused.is_some() => "refused",
            (Some(_), None) => "cut short",
        };
        *tally.entry(format!("{op:?} {outcome}")).or_default() += 1;
        match (&unsure, ack) {
            (None, _) => {}
            (Some(Unsure::Installed(name)), Some(_)) => {
                want.insert(
                    name.clone(),
                    Expect {
                        revision: 1,
                        version: "1.0.0".into(),
                    },
                );
            }
            (Some(Unsure::Uninstalled(name)), Some(_)) => {
                want.remove(name);
            }
            (Some(Unsure::Deployed { name, version }), Some(p)) => {
                assert_eq!(p["outcome"], "completed", "round {round}: {p}");
                want.insert(
                    name.clone(),
                    Expect {
                        revision: p["revision"].as_u64().unwrap(),
                        version: version.clone(),
                    },
                );
            }
            (Some(u), None) => {
                // Cut short (or refused): either the old state or the new
                // one, never something in between.
                assert!(
                    refused.is_none(),
                    "round {round}: {u:?} refused: {refused:?}"
                );
                match u {
                    Unsure::Installed(name) => {
                        if let Some(e) = now.get(name) {
                            assert_eq!(
                                e,
                                &Expect {
                                    revision: 1,
                                    version: "1.0.0".into()
                                },
                                "round {round}"
                            );
                            want.insert(name.clone(), e.clone());
                        }
                    }
                    Unsure::Uninstalled(name) => {
                        if !now.contains_key(name) {
                            want.remove(name);
                        }
                    }
                    Unsure::Deployed { name, version } => {
                        let e = &now[name];
                        if e != &acked[name] {
                            assert_eq!(
                                &e.version, version,
                                "round {round}: {name} on an unknown revision"
                            );
                            assert!(e.revision > acked[name].revision, "round {round}: {e:?}");
                            want.insert(name.clone(), e.clone());
                        }
                    }
                }
            }
        }
        assert_eq!(
            now, want,
            "round {round} ({op:?}, killed after {delay:?}): what runs vs what was acknowledged"
        );
        eprintln!(
            "round {round}: {op:?} killed after {delay:?}: {outcome}; {:?} ({:?})",
            acked.keys().collect::<Vec<_>>(),
            t0.elapsed()
        );
        acked = want;
    }
    eprintln!("kill -9 rounds survived: {rounds}; {tally:#?}");
}
