//! `cargo run --release -p ember-demo`: Ember in one command.
//!
//! Builds emberd and the example modules, starts emberd on a temporary
//! socket and state directory with the `catalog` plugin, installs `kv`,
//! `greeter` and `hello` through the control socket, calls greeter (which
//! answers through the kv service over shared memory), prints each
//! module's measured launch next to a cold start of the same module, then
//! keeps emberd running until Ctrl-C and shuts everything down.
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
use ember_benches::daemon::{self, Emberd, Options};
use ember_benches::launch::{self, Base, Order};
use ember_benches::{arg_num, mem};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};

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
        "[1/6] building emberd, emberctl, the catalog plugin and the kv, greeter, hello modules"
    );
    let profile = artifacts::build(&["supervisor", "catalog", "kv", "greeter", "hello"], false)?;

    let base = Base::catalog(&profile, catalog_mb);
    println!(
        "[2/6] starting emberd with the catalog plugin ({catalog_mb} MiB table built once, in the zygote)"
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

    println!("[3/6] installing modules through the control socket (Install until the module runs)");
    let port = if port != 0 && std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
        println!("      port {port} is taken; greeter gets any free port");
        0
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

    println!("[4/6] calling greeter over HTTP");
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

    println!("[5/6] the same modules started the old way: a fresh process initializes the plugin, then the module");
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
    pids.push(zygote);
    pids.push(d.pid());
    if once {
        println!("[6/6] --once: shutting down");
    } else {
        let ctl = profile.join("emberctl");
        println!("[6/6] emberd keeps running. Try, in another terminal:");
        if let Some(a) = greeter_addr {
            println!("      curl http://{a}/kv/get/visitor");
        }
        println!(
            "      {} --socket {} status greeter",
            ctl.display(),
            d.socket().display()
        );
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
