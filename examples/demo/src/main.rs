//! `cargo run --release -p ember-demo`: Ember in one command.
//!
//! Builds emberd and the example modules, starts emberd on a temporary
//! socket and state directory with the `catalog` plugin, installs `kv`,
//! `greeter` and `hello` through the control socket, calls greeter (which
//! answers through the kv service over shared memory), releases greeter
//! 0.2.0 with `Deploy` while an HTTP load runs against it and rolls it back
//! with `Rollback` (no request may fail), prints each module's measured
//! launch next to a cold start of the same module, then keeps emberd
//! running until Ctrl-C and shuts everything down.
//!
//! Flags: `--once` (do everything, then shut down: for tests and CI),
//! `--port N` (greeter's HTTP port, default 8080, `0` for any),
//! `--catalog-mb N` (the plugin's table, default 200).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use ember_benches::artifacts::{self, Stage};
use ember_benches::daemon::{self, Emberd, Options, RolloutTimes};
use ember_benches::http::{Load, LoadConfig, Mix, Record, Summary};
use ember_benches::launch::{self, Base, Order};
use ember_benches::{arg_num, mem};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use serde_json::json;

const MODULES: [&str; 3] = ["kv", "greeter", "hello"];

/// Why the demo stopped early.
type Error = Box<dyn std::error::Error>;

struct Launched {
    name: &'static str,
    warm: Duration,
    pids: Vec<u32>,
    order: Order,
}

fn main() -> ExitCode {
    launch::run_cold_child_if_requested();
    let once = std::env::args().any(|a| a == "--once");
    // Block Ctrl-C and SIGTERM before anything else: they are read from a
    // signalfd, so the shutdown runs in order.
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    if let Err(e) = mask.thread_block() {
        eprintln!("ember-demo: cannot block signals: {e}");
        return ExitCode::FAILURE;
    }
    match run(once, &mask) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("ember-demo: {}", module_runtime::sdk::error_chain(&*e));
            ExitCode::from(2)
        }
    }
}

fn run(once: bool, mask: &SigSet) -> Result<bool, Error> {
    let catalog_mb = arg_num("--catalog-mb", 200);
    let port = arg_num("--port", 8080) as u16;
    let mut ok = true;

    println!("== Ember demo ==");
    println!(
        "[1/7] building emberd, emberctl, the catalog plugin and the kv, greeter, hello modules"
    );
    let profile = artifacts::build(&["supervisor", "catalog", "kv", "greeter", "hello"], false)?;

    let base = Base::catalog(&profile, catalog_mb);
    println!(
        "[2/7] starting emberd with the catalog plugin ({catalog_mb} MiB table built once, in the zygote)"
    );
    let t = Instant::now();
    let mut d = Emberd::start(
        &daemon::emberd_bin(&profile),
        &Options {
            base: Some(base.clone()),
            ..Options::default()
        },
    )?;
    d.wait_pool_idle(1, Duration::from_secs(60))?;
    d.set_poll_interval(Duration::from_micros(200));
    let health = d.call("Health", serde_json::json!({}))?;
    let zygote = health["zygote_pid"].as_u64().unwrap_or(0) as u32;
    println!(
        "      emberd pid {}, zygote pid {zygote}, base ready in {} ms; socket {}",
        d.pid(),
        t.elapsed().as_millis(),
        d.socket().display()
    );

    println!("[3/7] installing modules through the control socket (Install until the module runs)");
    let port = if port != 0 && std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        println!("      port {port} is taken; greeter gets any free port");
        0
    } else {
        port
    };
    // A concrete port, even for "any": emberd hands a new revision the old
    // one's socket only when both manifests name the same address, and a
    // rollback to a revision that says `127.0.0.1:0` would bind a new port
    // (and close greeter's) instead.
    let port = if port == 0 {
        std::net::TcpListener::bind(("127.0.0.1", 0))?
            .local_addr()?
            .port()
    } else {
        port
    };
    let mods = d.dir().join("modules");
    let mut launched = Vec::new();
    let mut greeter_addr = None;
    for name in MODULES {
        let dir = mods.join(name);
        let artifact = artifacts::cdylib(&profile, name);
        let manifest = artifacts::stage_module(
            &dir,
            &artifacts::example_manifest(name),
            &artifact,
            &Stage {
                listen: Some(format!("127.0.0.1:{port}")),
                ..Stage::default()
            },
        )?;
        // greeter is released in step 5: its revisions commit after a
        // short `stable_after`, so a rollback back to this one is quick.
        let manifest = if name == "greeter" {
            with_rollout(&dir, &manifest)?
        } else {
            manifest
        };
        d.wait_pool_idle(1, Duration::from_secs(30))?;
        let (warm, _acknowledged) = d.install_until_running(&dir, name, Duration::from_secs(30))?;
        let status = d.status(name)?;
        let pids: Vec<u32> = status["replicas"]
            .as_array()
            .map(|rs| {
                rs.iter()
                    .filter_map(|r| r["pid"].as_u64().map(|p| p as u32))
                    .collect()
            })
            .unwrap_or_default();
        let mut extra = String::new();
        if let Some(a) = status["listeners"][0]["address"].as_str() {
            greeter_addr = a.parse::<SocketAddr>().ok();
            extra = format!(", http://{a}");
        }
        let real = pids
            .iter()
            .all(|&p| daemon::runs_module_artifact(p, d.state_dir()));
        println!(
            "      {name:<8} running in {:>7.3} ms  ({} replica{}, pid{} {:?}{extra}){}",
            ms(warm),
            pids.len(),
            if pids.len() == 1 { "" } else { "s" },
            if pids.len() == 1 { "" } else { "s" },
            pids,
            if real {
                ""
            } else {
                "  WARNING: the worker has not loaded the module"
            }
        );
        ok &= real;
        let listeners = if name == "greeter" {
            vec!["http".to_owned()]
        } else {
            Vec::new()
        };
        launched.push(Launched {
            name,
            warm,
            pids,
            order: Order {
                artifact: dir.join(artifact.file_name().expect("file name")),
                manifest,
                listeners,
            },
        });
    }

    // Replicas started after the install (by the release in step 5), for
    // the shutdown check.
    let mut extra_pids = Vec::new();

    println!("[4/7] calling greeter over HTTP");
    match greeter_addr {
        Some(addr) => {
            for (path, expect) in [
                ("/kv/put/visitor/ember", Some("ok")),
                ("/kv/get/visitor", Some("ember")),
                ("/hello/visitor", None),
                ("/catalog/42", None),
                ("/stats", None),
            ] {
                let (code, body) = match http_get(addr, path) {
                    Ok(r) => r,
                    Err(e) => (0, format!("request failed: {e}")),
                };
                let good = code == 200 && expect.is_none_or(|e| body == e);
                let note = match path {
                    "/kv/get/visitor" if good => "   <- answered by the kv module over shm-ipc",
                    "/catalog/42" if good => {
                        "   <- read in-process from the plugin the zygote built"
                    }
                    _ => "",
                };
                println!("      GET {path:<22} -> {code} {body}{note}");
                ok &= good;
            }
        }
        None => {
            println!("      greeter reported no listener address");
            ok = false;
        }
    }

    println!("[5/7] releasing greeter 0.2.0 while it answers requests");
    match (greeter_addr, launched.iter().find(|l| l.name == "greeter")) {
        (Some(addr), Some(g)) => {
            let (good, new_pids) = release(&mut d, &mods, &g.order.artifact, addr, g.pids.len())?;
            ok &= good;
            extra_pids.extend(new_pids);
        }
        _ => {
            println!("      greeter is not serving: nothing to release");
            ok = false;
        }
    }

    println!("[6/7] the same modules started the old way: a fresh process initializes the plugin, then the module");
    let exe = std::env::current_exe()?;
    println!(
        "      {:<8} {:>22} {:>14} {:>8}",
        "module", "warm launch (emberd)", "cold start", "ratio"
    );
    for l in &launched {
        let (w, t) = launch::cold_start(&exe, &base, &l.order, Duration::from_secs(120))?;
        w.stop(Duration::from_secs(2));
        println!(
            "      {:<8} {:>19.3} ms {:>11.1} ms {:>7.0}x",
            l.name,
            ms(l.warm),
            ms(t.ready),
            t.ready.as_secs_f64() / l.warm.as_secs_f64()
        );
    }

    let mut pids: Vec<u32> = launched.iter().flat_map(|l| l.pids.clone()).collect();
    pids.extend(extra_pids);
    pids.push(zygote);
    pids.push(d.pid());
    if once {
        println!("[7/7] --once: shutting down");
    } else {
        let ctl = profile.join("emberctl");
        println!("[7/7] emberd keeps running. Try, in another terminal:");
        if let Some(a) = greeter_addr {
            println!("      curl http://{a}/kv/get/visitor");
        }
        for cmd in ["status greeter", "history greeter"] {
            println!(
                "      {} --socket {} {cmd}",
                ctl.display(),
                d.socket().display()
            );
        }
        println!("      Ctrl-C stops emberd and every module, and removes its directory.");
        wait_for_signal(mask, &mut d)?;
        println!();
        println!("shutting down");
    }
    let dir: PathBuf = d.dir().to_owned();
    let socket = d.socket().to_owned();
    let status = d.stop(Duration::from_secs(30));
    drop(d);
    let left: Vec<u32> = pids.into_iter().filter(|&p| mem::alive(p)).collect();
    let clean = left.is_empty() && !exists(&socket) && !exists(&dir);
    println!(
        "emberd exited ({}); processes left: {:?}; socket and state directory removed: {}",
        status.map_or_else(|| "unknown".into(), |s| s.to_string()),
        left,
        !exists(&socket) && !exists(&dir)
    );
    if clean {
        println!("shutdown clean");
    }
    Ok(ok && clean)
}

/// Adds `[rollout] stable_after` to the staged manifest in `dir` (text
/// `manifest`) and returns the new text.
fn with_rollout(dir: &Path, manifest: &str) -> Result<String, Error> {
    let mut t: toml::Table = toml::from_str(manifest)?;
    let mut r = toml::Table::new();
    r.insert("stable_after".into(), STABLE_AFTER.into());
    t.insert("rollout".into(), r.into());
    let text = toml::to_string(&t)?;
    std::fs::write(dir.join("module.toml"), &text)?;
    Ok(text)
}

/// Step 5: `Deploy` of greeter 0.2.0 (same artifact, another greeting)
/// under a bounded HTTP load, then `Rollback` to 0.1.0 under the same load.
/// Returns whether both completed with no failed request and `/version`
/// switched each time, and the pids of the replicas they started.
fn release(
    d: &mut Emberd,
    mods: &Path,
    artifact: &Path,
    addr: SocketAddr,
    replicas: usize,
) -> Result<(bool, Vec<u32>), Error> {
    let dir = artifacts::write_manifest(
        &mods.join("greeter-0.2.0"),
        &mods.join("greeter").join("module.toml"),
        artifact,
        |t| {
            t.insert("version".into(), "0.2.0".into());
            if let Some(c) = t.get_mut("config").and_then(toml::Value::as_table_mut) {
                c.insert("greeting".into(), "hi".into());
            }
            // The address greeter listens on (its port resolved): the new
            // replicas accept from the same socket as the old ones.
            for l in t
                .get_mut("listeners")
                .and_then(toml::Value::as_array_mut)
                .into_iter()
                .flatten()
                .filter_map(toml::Value::as_table_mut)
            {
                l.insert("address".into(), addr.to_string().into());
            }
        },
    )?;
    println!(
        "      {}: version 0.2.0, greeting \"hi\", the same artifact; [rollout] stable_after = \"{STABLE_AFTER}\"",
        dir.join("module.toml").display()
    );
    println!(
        "      {LOAD_CLIENTS} HTTP clients (half keep-alive) send /hello and /kv requests to greeter throughout"
    );
    let mut ok = true;
    let mut pids = Vec::new();
    let steps = [
        ("Deploy", json!({"path": dir}), "0.2.0", "the release"),
        (
            "Rollback",
            json!({"name": "greeter"}),
            "0.1.0",
            "the rollback",
        ),
    ];
    for (method, params, version, what) in steps {
        println!("      {method} (with more):");
        let roll = roll_under_load(d, method, params, addr, replicas as u64)?;
        let t = &roll.times;
        for p in &t.progress {
            println!(
                "        {:>8.1} ms  {}: new {}/{replicas} ready, old {}",
                ms(p.at),
                p.phase,
                p.new_ready,
                p.old_replicas
            );
        }
        let reason = if t.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", t.reason)
        };
        println!(
            "        {:>8.1} ms  {}{reason}",
            ms(t.total),
            if t.outcome.is_empty() {
                "no outcome"
            } else {
                &t.outcome
            }
        );
        let completed = t.outcome == "completed";
        if completed {
            println!(
                "      {} {version} in {:.1} ms (call to stabilizing: every replica on {version}, the old ones exited); committed {:.0} ms later, after stable_after",
                if method == "Deploy" {
                    "released"
                } else {
                    "rolled back to"
                },
                ms(t.done),
                ms(t.total.saturating_sub(t.done))
            );
        } else {
            println!("      {method} did not complete: {}{reason}", t.outcome);
        }
        let during = Summary::of(&roll.records, |r| r.overlaps(&[roll.window]));
        let all = Summary::of(&roll.records, |_| true);
        println!(
            "      {} requests during {what}, {} failed ({} in all with the {} ms before and after, {} failed{}{})",
            during.requests,
            during.failed,
            all.requests,
            MARGIN.as_millis(),
            all.failed,
            if all.failed > 0 {
                format!(": {}", all.failures_text())
            } else {
                String::new()
            },
            if all.retried > 0 {
                format!(
                    "; {} retried on a new connection after the server closed an idle one",
                    all.retried
                )
            } else {
                String::new()
            }
        );
        ok &= completed && all.failed == 0 && all.requests > 0;
        if !completed {
            // Nothing to roll back, or nothing to show.
            return Ok((false, pids));
        }
        let versions = version_check(addr, version);
        ok &= versions;
        pids.extend(replica_pids(d)?);
    }
    Ok((ok, pids))
}

/// A `Deploy` or `Rollback` and the load around it.
struct Roll {
    times: RolloutTimes,
    /// Call → final reply, since the load's start.
    window: (Duration, Duration),
    records: Vec<Record>,
}

/// HTTP clients of the load.
const LOAD_CLIENTS: usize = 4;
/// Load before the call and after its final reply.
const MARGIN: Duration = Duration::from_millis(300);
/// `[rollout] stable_after` of greeter's revisions.
const STABLE_AFTER: &str = "500ms";

fn roll_under_load(
    d: &mut Emberd,
    method: &str,
    params: serde_json::Value,
    addr: SocketAddr,
    replicas: u64,
) -> Result<Roll, Error> {
    // A surge starts every new replica beside the old ones, from the pool.
    d.wait_pool_idle(replicas, Duration::from_secs(60))?;
    let load = Load::start(&LoadConfig {
        addr,
        clients: LOAD_CLIENTS,
        interval: Duration::from_millis(5),
        timeout: Duration::from_secs(5),
        max_duration: Duration::from_secs(120),
        max_requests: 200_000,
        mix: Mix::HelloAndKv,
    });
    std::thread::sleep(MARGIN);
    let res = d.call_more(method, params, Duration::from_secs(60));
    std::thread::sleep(MARGIN);
    let t0 = load.t0();
    let records = load.stop();
    let (call, replies) = res?;
    let times = daemon::rollout_times(call, &replies, replicas);
    let from = call.saturating_duration_since(t0);
    Ok(Roll {
        window: (from, from + times.total),
        times,
        records,
    })
}

/// Asks `/version` on a few new connections (each may reach any replica)
/// and `/hello/visitor` once; prints the answers. Whether every `/version`
/// answer names `version`.
fn version_check(addr: SocketAddr, version: &str) -> bool {
    const ASKS: usize = 4;
    let answers: Vec<(u16, String)> = (0..ASKS)
        .map(|_| http_get(addr, "/version").unwrap_or_else(|e| (0, format!("request failed: {e}"))))
        .collect();
    let good = answers
        .iter()
        .filter(|(code, body)| *code == 200 && body.split(' ').next() == Some(version))
        .count();
    let mut seen: Vec<String> = answers.iter().map(|(c, b)| format!("{c} {b}")).collect();
    seen.sort_unstable();
    seen.dedup();
    println!(
        "      GET /version       -> {} ({good} of {ASKS} answers on new connections are {version})",
        seen.join(" | ")
    );
    let hello = match http_get(addr, "/hello/visitor") {
        Ok((code, body)) => format!("{code} {body}"),
        Err(e) => format!("request failed: {e}"),
    };
    println!("      GET /hello/visitor -> {hello}");
    good == ASKS
}

/// The pids of greeter's replicas.
fn replica_pids(d: &mut Emberd) -> Result<Vec<u32>, Error> {
    Ok(d.status("greeter")?["replicas"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .filter_map(|r| r["pid"].as_u64().map(|p| p as u32))
                .collect()
        })
        .unwrap_or_default())
}

fn exists(p: &Path) -> bool {
    p.symlink_metadata().is_ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn wait_for_signal(mask: &SigSet, d: &mut Emberd) -> Result<(), Error> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let sfd = SignalFd::with_flags(mask, SfdFlags::SFD_CLOEXEC)?;
    loop {
        let mut fds = [PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(500u16)) {
            Ok(n) if n > 0 => return Ok(()),
            Err(nix::errno::Errno::EINTR) | Ok(_) => {}
            Err(e) => return Err(e.into()),
        }
        if !d.is_running() {
            return Err("emberd exited on its own".into());
        }
    }
}

fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.trim().to_owned())
        .unwrap_or_default();
    Ok((code, body))
}
