//! Deploy benchmark: zero-downtime rollouts of a module under HTTP load,
//! against the old way (replicas restarted as fresh processes), in one run.
//! `docs/benchmarks.md` says exactly what is timed.
//!
//! - emberd on the demo base (the `catalog` plugin, 200 MiB), `kv`
//!   installed, `greeter` with 8 replicas importing it;
//! - a bounded in-process HTTP load ([`ember_benches::http`]) on greeter's
//!   port throughout: half the clients on keep-alive connections, half a
//!   connection per request, `/hello/…`, `/kv/put/…`, `/kv/get/…`;
//! - `Deploy` (with `more`) of two greeter versions alternately, then
//!   `Rollback`s, then `Deploy`s of two kv versions (the exporter greeter
//!   calls), then a greeter revision that panics in `start` (must abort);
//! - the baseline: 8 greeter replicas as standalone cold processes serving
//!   one socket, replaced in two batches of 4 (each fresh process
//!   initializes the plugin, then the module), under the same load.
//!
//! `cargo bench --bench deploy -- --json [--chart DIR] [--only ember|cold]
//! [--replicas 8] [--deploys 10] [--rollbacks 3] [--exporter-deploys 4]
//! [--clients 8] [--interval-ms 5] [--gap-ms 500] [--catalog-mb 200]`
//! (`EMBER_BENCH_DEPLOY_ONLY=cold` works like `--only cold`) prints
//! human-readable lines on stderr, then one JSON object as the last line on
//! stdout.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_benches::artifacts::{self, TempDir};
use ember_benches::daemon::{self, DaemonError, Emberd, Options, RolloutProgress, RolloutTimes};
use ember_benches::http::{self, Load, LoadConfig, Mix, Record, Summary};
use ember_benches::launch::{self, Base, Order, Worker};
use ember_benches::svg::{self, Dot, Marker, Steps};
use ember_benches::{arg_num, arg_value, json_requested, machine_summary, ms, JsonLine, Samples};
use serde_json::{json, Value};

const NAME: &str = "greeter";
const TIMEOUT: Duration = Duration::from_secs(120);
const STOP: Duration = Duration::from_secs(2);
/// The rollout's `stable_after` in the staged manifests.
const STABLE_AFTER: &str = "300ms";

struct Args {
    replicas: u64,
    deploys: usize,
    rollbacks: usize,
    exporter_deploys: usize,
    clients: usize,
    interval: Duration,
    gap: Duration,
    catalog_mb: u64,
    ember: bool,
    cold: bool,
}

impl Args {
    fn parse() -> Self {
        let only = arg_value("--only").or_else(|| std::env::var("EMBER_BENCH_DEPLOY_ONLY").ok());
        let (ember, cold) = match only.as_deref() {
            None | Some("") => (true, true),
            Some("ember") => (true, false),
            Some("cold") => (false, true),
            Some(o) => panic!("--only expects `ember` or `cold`, got {o:?}"),
        };
        Self {
            replicas: arg_num("--replicas", 8).max(2),
            deploys: arg_num("--deploys", 10) as usize,
            rollbacks: arg_num("--rollbacks", 3) as usize,
            exporter_deploys: arg_num("--exporter-deploys", 4) as usize,
            clients: (arg_num("--clients", 8) as usize).max(4),
            interval: Duration::from_millis(arg_num("--interval-ms", 5)),
            gap: Duration::from_millis(arg_num("--gap-ms", 500)),
            catalog_mb: arg_num("--catalog-mb", 200),
            ember,
            cold,
        }
    }

    fn load(&self, addr: SocketAddr, mix: Mix) -> LoadConfig {
        LoadConfig {
            addr,
            clients: self.clients,
            interval: self.interval,
            timeout: Duration::from_secs(5),
            // Hard caps: no phase of this run lasts this long.
            max_duration: Duration::from_secs(300),
            max_requests: 2_000_000,
            mix,
        }
    }
}

/// One change of revision, as the `Deploy`/`Rollback` caller saw it.
#[derive(Debug, Clone)]
struct Roll {
    /// Call → final reply, since the load's start.
    window: (Duration, Duration),
    times: RolloutTimes,
}

fn roll(
    d: &mut Emberd,
    t0: Instant,
    method: &str,
    params: Value,
    replicas: u64,
) -> Result<Roll, DaemonError> {
    let (call, replies) = d.call_more(method, params, TIMEOUT)?;
    let times = daemon::rollout_times(call, &replies, replicas);
    Ok(Roll {
        window: (call - t0, call - t0 + times.total),
        times,
    })
}

/// The module directories this run deploys.
struct Staged {
    greeter: [PathBuf; 2],
    kv: [PathBuf; 2],
    broken: PathBuf,
    /// The same release on a module nobody calls (a greeter named
    /// `bystander`, no import): what starting and stopping that many
    /// processes costs the module that serves.
    bystander: [PathBuf; 2],
}

fn stage(tmp: &Path, profile: &Path, replicas: u64) -> Result<Staged, artifacts::BuildError> {
    let rollout = |t: &mut toml::Table| {
        let mut r = toml::Table::new();
        r.insert("strategy".into(), "surge".into());
        r.insert("stable_after".into(), STABLE_AFTER.into());
        t.insert("rollout".into(), r.into());
    };
    let greeter = |dir: &str, version: &str, greeting: &str, entry: &Path| {
        artifacts::write_manifest(
            &tmp.join(dir),
            &artifacts::example_manifest(NAME),
            entry,
            |t| {
                t.insert("version".into(), version.into());
                t.insert("replicas".into(), (replicas as i64).into());
                for l in t
                    .get_mut("listeners")
                    .and_then(toml::Value::as_array_mut)
                    .into_iter()
                    .flatten()
                    .filter_map(toml::Value::as_table_mut)
                {
                    l.insert("address".into(), "127.0.0.1:0".into());
                }
                if let Some(c) = t.get_mut("config").and_then(toml::Value::as_table_mut) {
                    c.insert("greeting".into(), greeting.into());
                }
                rollout(t);
            },
        )
    };
    let kv = |dir: &str, version: &str, max: i64| {
        artifacts::write_manifest(
            &tmp.join(dir),
            &artifacts::example_manifest("kv"),
            &artifacts::cdylib(profile, "kv"),
            |t| {
                t.insert("version".into(), version.into());
                if let Some(c) = t.get_mut("config").and_then(toml::Value::as_table_mut) {
                    c.insert("max_value_bytes".into(), max.into());
                }
                rollout(t);
            },
        )
    };
    let so = artifacts::cdylib(profile, NAME);
    let bystander = |dir: &str, version: &str| {
        artifacts::write_manifest(
            &tmp.join(dir),
            &artifacts::example_manifest(NAME),
            &so,
            |t| {
                t.insert("name".into(), BYSTANDER.into());
                t.insert("version".into(), version.into());
                t.insert("replicas".into(), (replicas as i64).into());
                t.remove("imports");
                for l in t
                    .get_mut("listeners")
                    .and_then(toml::Value::as_array_mut)
                    .into_iter()
                    .flatten()
                    .filter_map(toml::Value::as_table_mut)
                {
                    l.insert("address".into(), "127.0.0.1:0".into());
                }
                rollout(t);
            },
        )
    };
    Ok(Staged {
        bystander: [
            bystander("bystander-0.1.0", "0.1.0")?,
            bystander("bystander-0.2.0", "0.2.0")?,
        ],
        greeter: [
            greeter("greeter-0.1.0", "0.1.0", "hello", &so)?,
            greeter("greeter-0.2.0", "0.2.0", "hi", &so)?,
        ],
        kv: [
            kv("kv-0.1.0", "0.1.0", 1024)?,
            kv("kv-0.2.0", "0.2.0", 2048)?,
        ],
        broken: greeter(
            "greeter-0.3.0-panics",
            "0.3.0",
            "never served",
            &artifacts::cdylib(profile, "fixture-panic-start"),
        )?,
    })
}

/// The module of phase E.
const BYSTANDER: &str = "bystander";

/// The greeting each greeter version answers with.
const GREETINGS: [&str; 2] = ["hello", "hi"];

#[derive(Default)]
struct EmberOut {
    addr: Option<SocketAddr>,
    deploy_error: Option<String>,
    /// Phase A: greeter deploys.
    deploys: Vec<Roll>,
    deploy_records: Vec<Record>,
    verified: u64,
    rollbacks: Vec<Roll>,
    rollback_records: Vec<Record>,
    exporter: Vec<Roll>,
    exporter_records: Vec<Record>,
    aborted: Option<Roll>,
    aborted_records: Vec<Record>,
    /// Phase E: releases of a module nobody calls, under the same load.
    bystander: Vec<Roll>,
    bystander_records: Vec<Record>,
}

fn with_load<R>(cfg: &LoadConfig, gap: Duration, f: impl FnOnce(Instant) -> R) -> (R, Vec<Record>) {
    let load = Load::start(cfg);
    std::thread::sleep(gap * 2);
    let r = f(load.t0());
    std::thread::sleep(gap);
    (r, load.stop())
}

/// Whether greeter answers with `greeting` on a few new connections.
fn serves(addr: SocketAddr, greeting: &str) -> bool {
    (0..4).all(|_| {
        http::get(addr, "/hello/probe", Duration::from_secs(5)).is_ok_and(|r| {
            r.status == 200 && String::from_utf8_lossy(&r.body).starts_with(greeting)
        })
    })
}

fn run_ember(a: &Args, bin: &Path, base: &Base, st: &Staged) -> Result<EmberOut, DaemonError> {
    let mut out = EmberOut::default();
    let mut d = Emberd::start(
        bin,
        &Options {
            base: Some(base.clone()),
            // Enough warm workers for a whole surge.
            min_idle: a.replicas as usize,
            max_idle: a.replicas as usize + 2,
            ..Options::default()
        },
    )?;
    d.set_poll_interval(Duration::from_millis(20));
    d.install(&st.kv[0])?;
    d.wait_running("kv", TIMEOUT)?;
    d.install(&st.greeter[0])?;
    let status = d.wait_running(NAME, TIMEOUT)?;
    let addr: SocketAddr = status["listeners"][0]["address"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| DaemonError::ModuleFailed {
            name: NAME.into(),
            state: "running".into(),
            reason: format!("no TCP listener in its status: {}", status["listeners"]),
        })?;
    out.addr = Some(addr);
    wait_wired(&mut d)?;
    if !serves(addr, GREETINGS[0]) {
        return Err(DaemonError::ModuleFailed {
            name: NAME.into(),
            state: "running".into(),
            reason: format!("does not answer GET /hello on {addr}"),
        });
    }
    eprintln!(
        "greeter ({} replicas) serves on {addr}; kv wired",
        a.replicas
    );
    let cfg = a.load(addr, Mix::HelloAndKv);
    let min_idle = a.replicas;

    // A. Greeter deploys, alternating the two versions.
    let (res, recs) = with_load(&cfg, a.gap, |t0| -> Result<(), DaemonError> {
        for i in 0..a.deploys {
            let v = (i + 1) % 2;
            d.wait_pool_idle(min_idle, TIMEOUT)?;
            let r = match roll(
                &mut d,
                t0,
                "Deploy",
                json!({"path": st.greeter[v]}),
                a.replicas,
            ) {
                Ok(r) => r,
                Err(e) if out.deploys.is_empty() && e.remote().is_some() => {
                    out.deploy_error = Some(module_runtime::sdk::error_chain(&e));
                    return Ok(());
                }
                Err(e) => return Err(e),
            };
            eprintln!(
                "deploy {i:>2} → {}: stabilizing {:.1} ms, cutover {}, final {:.1} ms, {}{}",
                ["0.1.0", "0.2.0"][v],
                ms_of(r.times.done),
                r.times
                    .cutover
                    .map_or("-".into(), |c| format!("{:.1} ms", ms_of(c))),
                ms_of(r.times.total),
                r.times.outcome,
                if r.times.reason.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", r.times.reason)
                }
            );
            if r.times.outcome == "completed" && serves(addr, GREETINGS[v]) {
                out.verified += 1;
            }
            out.deploys.push(r);
            std::thread::sleep(a.gap);
        }
        Ok(())
    });
    res?;
    out.deploy_records = recs;
    if out.deploy_error.is_some() {
        return Ok(out);
    }

    // B. Rollbacks to the previous revision.
    let (res, recs) = with_load(&cfg, a.gap, |t0| -> Result<(), DaemonError> {
        for i in 0..a.rollbacks {
            d.wait_pool_idle(min_idle, TIMEOUT)?;
            let r = roll(&mut d, t0, "Rollback", json!({"name": NAME}), a.replicas)?;
            eprintln!(
                "rollback {i}: stabilizing {:.1} ms, final {:.1} ms, {}",
                ms_of(r.times.done),
                ms_of(r.times.total),
                r.times.outcome
            );
            out.rollbacks.push(r);
            std::thread::sleep(a.gap);
        }
        Ok(())
    });
    res?;
    out.rollback_records = recs;

    // C. New revisions of the exporter greeter's kv calls go to.
    let (res, recs) = with_load(&cfg, a.gap, |t0| -> Result<(), DaemonError> {
        for i in 0..a.exporter_deploys {
            d.wait_pool_idle(min_idle, TIMEOUT)?;
            let r = roll(&mut d, t0, "Deploy", json!({"path": st.kv[(i + 1) % 2]}), 1)?;
            eprintln!(
                "kv deploy {i}: stabilizing {:.1} ms, final {:.1} ms, {}",
                ms_of(r.times.done),
                ms_of(r.times.total),
                r.times.outcome
            );
            out.exporter.push(r);
            std::thread::sleep(a.gap);
        }
        Ok(())
    });
    res?;
    out.exporter_records = recs;

    // D. A revision that panics in `start`: the rollout must abort.
    let (res, recs) = with_load(&cfg, a.gap, |t0| -> Result<(), DaemonError> {
        d.wait_pool_idle(min_idle, TIMEOUT)?;
        let r = roll(&mut d, t0, "Deploy", json!({"path": st.broken}), a.replicas)?;
        eprintln!(
            "broken deploy: {} after {:.1} ms ({})",
            r.times.outcome,
            ms_of(r.times.total),
            r.times.reason
        );
        out.aborted = Some(r);
        Ok(())
    });
    res?;
    out.aborted_records = recs;

    // E. The same release of a module nobody calls: greeter's latency
    // during these windows is what the start and exit of that many
    // processes cost on this machine, whatever module they are.
    d.install(&st.bystander[0])?;
    d.wait_running(BYSTANDER, TIMEOUT)?;
    let (res, recs) = with_load(&cfg, a.gap, |t0| -> Result<(), DaemonError> {
        for i in 0..a.deploys {
            d.wait_pool_idle(min_idle, TIMEOUT)?;
            let path = &st.bystander[(i + 1) % 2];
            let r = roll(&mut d, t0, "Deploy", json!({"path": path}), a.replicas)?;
            out.bystander.push(r);
            std::thread::sleep(a.gap);
        }
        Ok(())
    });
    res?;
    out.bystander_records = recs;
    d.stop(Duration::from_secs(15));
    Ok(out)
}

/// Waits until every greeter replica has its channel to kv.
fn wait_wired(d: &mut Emberd) -> Result<(), DaemonError> {
    let end = Instant::now() + TIMEOUT;
    loop {
        let s = d.status(NAME)?;
        let wired = s["imports"]
            .as_array()
            .is_some_and(|i| i.iter().all(|i| i["state"] == "wired"));
        if wired {
            return Ok(());
        }
        if Instant::now() > end {
            return Err(DaemonError::Timeout(TIMEOUT, "greeter's kv import".into()));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct ColdOut {
    total: Duration,
    batches: Vec<Duration>,
    plugin_init: Samples,
    records: Vec<Record>,
    /// `(ms since the first stop, replicas serving)`.
    serving: Vec<(f64, f64)>,
    /// When the first stop began, since the load's start.
    origin: Duration,
}

/// Starts `n` cold processes at once, each serving `listener`.
fn start_cold(
    n: usize,
    exe: &Path,
    base: &Base,
    order: &Order,
    listener: &TcpListener,
    init: &mut Samples,
) -> Result<Vec<Worker>, launch::LaunchError> {
    let fd = listener.as_fd();
    // Spawned here, on the calling thread: the workers die with the thread
    // that spawned them. Their init runs in parallel.
    let pending = (0..n)
        .map(|_| launch::cold_spawn(exe, base))
        .collect::<Result<Vec<_>, _>>()?;
    let started: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = pending
            .into_iter()
            .map(|p| s.spawn(move || p.finish_sharing(order, &[("http", fd)], TIMEOUT)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().expect("cold start thread panicked"))
            .collect()
    });
    let mut workers = Vec::with_capacity(n);
    let mut first_err = None;
    for r in started {
        match r {
            Ok((w, t)) => {
                init.push(t.idle);
                workers.push(w);
            }
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        // Dropping the others kills them.
        Some(e) => Err(e),
        None => Ok(workers),
    }
}

fn stop_all(workers: Vec<Worker>) {
    std::thread::scope(|s| {
        for w in workers {
            s.spawn(move || w.stop(STOP));
        }
    });
}

fn run_cold(
    a: &Args,
    exe: &Path,
    base: &Base,
    profile: &Path,
    tmp: &Path,
) -> Result<ColdOut, String> {
    let err = |e: launch::LaunchError| module_runtime::sdk::error_chain(&e);
    let dir = artifacts::write_manifest(
        &tmp.join("greeter-cold"),
        &artifacts::example_manifest(NAME),
        &artifacts::cdylib(profile, NAME),
        |t| {
            t.insert("replicas".into(), 1.into());
        },
    )
    .map_err(|e| module_runtime::sdk::error_chain(&e))?;
    let order = Order {
        artifact: artifacts::cdylib(profile, NAME),
        manifest: std::fs::read_to_string(dir.join("module.toml")).map_err(|e| e.to_string())?,
        listeners: Vec::new(),
    };
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let n = a.replicas as usize;
    let half = n / 2;
    let mut init = Samples::default();
    // Off the clock: the initial fleet, in the same two batches.
    let mut fleet = start_cold(half, exe, base, &order, &listener, &mut init).map_err(err)?;
    fleet.extend(start_cold(n - half, exe, base, &order, &listener, &mut init).map_err(err)?);
    if !serves(addr, GREETINGS[0]) {
        return Err(format!(
            "the cold replicas do not answer GET /hello on {addr}: {:?}",
            http::get(addr, "/hello/probe", Duration::from_secs(5))
        ));
    }
    eprintln!("cold fleet: {n} standalone greeter processes serve {addr}");
    let mut init = Samples::default();
    let cfg = a.load(addr, Mix::HelloOnly);
    let (res, records) = with_load(&cfg, a.gap, |t0| {
        let t = Instant::now();
        let origin = t - t0;
        let mut batches = Vec::new();
        let mut serving = vec![(0.0, n as f64)];
        let second = fleet.split_off(half);
        let mut fresh = Vec::new();
        for batch in [fleet, second] {
            let tb = Instant::now();
            let k = batch.len();
            stop_all(batch);
            serving.push((ms_of(t.elapsed()), (n - k) as f64));
            let started = start_cold(k, exe, base, &order, &listener, &mut init).map_err(err)?;
            fresh.extend(started);
            serving.push((ms_of(t.elapsed()), n as f64));
            batches.push(tb.elapsed());
        }
        Ok::<_, String>((t.elapsed(), batches, serving, fresh, origin))
    });
    let (total, batches, serving, fresh, origin) = res?;
    stop_all(fresh);
    Ok(ColdOut {
        total,
        batches,
        plugin_init: init,
        records,
        serving,
        origin,
    })
}

fn ms_of(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn p(v: &[Duration], q: f64) -> f64 {
    let mut s = Samples::default();
    for d in v {
        s.push(*d);
    }
    if s.is_empty() {
        0.0
    } else {
        ms(s.percentile(q))
    }
}

fn main() {
    launch::run_cold_child_if_requested();
    let json = json_requested();
    let a = Args::parse();
    eprintln!("building catalog, greeter, kv, fixture-panic-start and emberd…");
    let profile = artifacts::build(
        &["catalog", NAME, "kv", "fixture-panic-start", "supervisor"],
        true,
    )
    .unwrap_or_else(|e| panic!("{}", module_runtime::sdk::error_chain(&e)));
    let base = Base::catalog(&profile, a.catalog_mb);
    let tmp = TempDir::new("ember-bench-deploy").expect("temp dir");
    let staged = stage(tmp.path(), &profile, a.replicas)
        .unwrap_or_else(|e| panic!("{}", module_runtime::sdk::error_chain(&e)));
    let exe = std::env::current_exe().expect("current exe");

    let ember = a.ember.then(|| {
        run_ember(&a, &daemon::emberd_bin(&profile), &base, &staged)
            .map_err(|e| module_runtime::sdk::error_chain(&e))
    });
    let cold = a
        .cold
        .then(|| run_cold(&a, &exe, &base, &profile, tmp.path()));
    drop(tmp);

    let mut out = JsonLine::default();
    out.int("replicas", a.replicas)
        .int("clients", a.clients as u64)
        .int("catalog_mb", a.catalog_mb);
    let mut deploy_p50 = None;
    let mut met = true;
    match &ember {
        None => met = false,
        Some(Err(e)) => {
            eprintln!("emberd phases failed: {e}");
            out.str("ember_error", e);
            met = false;
        }
        Some(Ok(e)) => {
            let windows: Vec<_> = e.deploys.iter().map(|r| r.window).collect();
            let all = Summary::of(&e.deploy_records, |_| true);
            let mut steady = Summary::of(&e.deploy_records, |r| !r.overlaps(&windows));
            let mut during = Summary::of(&e.deploy_records, |r| r.overlaps(&windows));
            if std::env::var_os("EMBER_BENCH_DEPLOY_SLOW").is_some() {
                // Diagnostics: the slowest requests during the windows.
                let mut slow: Vec<_> = e
                    .deploy_records
                    .iter()
                    .filter(|r| r.overlaps(&windows) && r.failure.is_none())
                    .collect();
                slow.sort_by_key(|r| std::cmp::Reverse(r.latency));
                for r in slow.iter().take(60) {
                    let w = windows
                        .iter()
                        .find(|(a, b)| r.start <= *b && r.end() >= *a)
                        .map_or(0.0, |(a, _)| {
                            r.start.as_secs_f64() * 1e3 - a.as_secs_f64() * 1e3
                        });
                    eprintln!(
                        "slow: {:7.3} ms at {:+8.2} ms of its window, {:?}, keep-alive {}",
                        r.latency.as_secs_f64() * 1e3,
                        w,
                        r.route,
                        r.keep_alive
                    );
                }
            }
            let completed = e
                .deploys
                .iter()
                .filter(|r| r.times.outcome == "completed")
                .count();
            if let Some(err) = &e.deploy_error {
                eprintln!("Deploy is not available: {err}");
                out.str("deploy_error", err);
                met = false;
            }
            let done: Vec<_> = e.deploys.iter().map(|r| r.times.done).collect();
            let cut: Vec<_> = e.deploys.iter().filter_map(|r| r.times.cutover).collect();
            let fin: Vec<_> = e.deploys.iter().map(|r| r.times.total).collect();
            eprintln!(
                "deploys: {} ({completed} completed, {} serving the new version afterwards), p50 {:.1} ms p99 {:.1} ms, cutover p50 {:.1} ms, final reply p50 {:.1} ms",
                e.deploys.len(),
                e.verified,
                p(&done, 50.0),
                p(&done, 99.0),
                p(&cut, 50.0),
                p(&fin, 50.0)
            );
            eprintln!(
                "requests: {} ({} failed: {}; {} retried), latency p99 steady {:.2} ms, during deploys {:.2} ms",
                all.requests,
                all.failed,
                all.failures_text(),
                all.retried,
                steady.p_ms(99.0),
                during.p_ms(99.0)
            );
            if !e.deploys.is_empty() {
                deploy_p50 = Some(p(&done, 50.0));
                out.int("deploys", e.deploys.len() as u64)
                    .int("deploys_completed", completed as u64)
                    .int("deploys_verified", e.verified)
                    .num("deploy_p50_ms", p(&done, 50.0))
                    .num("deploy_p99_ms", p(&done, 99.0))
                    .num("cutover_p50_ms", p(&cut, 50.0))
                    .int("cutover_samples", cut.len() as u64)
                    .num("deploy_final_reply_p50_ms", p(&fin, 50.0));
            } else {
                out.int("deploys", 0);
            }
            met &= e.deploy_error.is_none() && completed == a.deploys && a.deploys >= 1;
            out.int("requests", all.requests)
                .int("failed_requests", all.failed)
                .int("retried_requests", all.retried)
                .num("latency_p50_steady_ms", steady.p_ms(50.0))
                .num("latency_p99_steady_ms", steady.p_ms(99.0))
                .int("requests_during_deploy", during.requests)
                .num("latency_p99_during_deploy_ms", during.p_ms(99.0));
            met &= all.failed == 0
                && during.requests > 0
                && during.p_ms(99.0) <= 3.0 * steady.p_ms(99.0);
            if e.deploy_error.is_none() {
                let rb: Vec<_> = e.rollbacks.iter().map(|r| r.times.done).collect();
                let rb_ok = e
                    .rollbacks
                    .iter()
                    .filter(|r| r.times.outcome == "completed")
                    .count();
                let rbs = Summary::of(&e.rollback_records, |_| true);
                eprintln!(
                    "rollbacks: {} ({rb_ok} completed), p50 {:.1} ms; requests {} ({} failed: {}; {} retried)",
                    rb.len(),
                    p(&rb, 50.0),
                    rbs.requests,
                    rbs.failed,
                    rbs.failures_text(),
                    rbs.retried
                );
                out.int("rollbacks", rb.len() as u64)
                    .int("rollbacks_completed", rb_ok as u64)
                    .num("rollback_p50_ms", p(&rb, 50.0))
                    .int("rollback_requests", rbs.requests)
                    .int("rollback_failed_requests", rbs.failed)
                    .int("rollback_retried_requests", rbs.retried);
                met &= rbs.failed == 0 && rb_ok == a.rollbacks;

                let ew: Vec<_> = e.exporter.iter().map(|r| r.window).collect();
                let ex: Vec<_> = e.exporter.iter().map(|r| r.times.done).collect();
                let ex_ok = e
                    .exporter
                    .iter()
                    .filter(|r| r.times.outcome == "completed")
                    .count();
                let calls =
                    Summary::of(&e.exporter_records, |r| r.route.is_kv() && r.overlaps(&ew));
                let phase = Summary::of(&e.exporter_records, |_| true);
                eprintln!(
                    "kv deploys: {} ({ex_ok} completed), p50 {:.1} ms; kv routes during them {} ({} failed: {}); whole phase {} requests, {} failed",
                    ex.len(),
                    p(&ex, 50.0),
                    calls.requests,
                    calls.failed,
                    calls.failures_text(),
                    phase.requests,
                    phase.failed
                );
                out.int("exporter_deploys", ex.len() as u64)
                    .int("exporter_deploys_completed", ex_ok as u64)
                    .num("exporter_deploy_p50_ms", p(&ex, 50.0))
                    .int("service_calls", calls.requests)
                    .int("failed_service_calls", calls.failed)
                    .int("exporter_phase_failed_requests", phase.failed);
                met &= calls.failed == 0 && calls.requests > 0 && ex_ok == a.exporter_deploys;

                if !e.bystander.is_empty() {
                    let bw: Vec<_> = e.bystander.iter().map(|r| r.window).collect();
                    let mut by = Summary::of(&e.bystander_records, |r| r.overlaps(&bw));
                    let by_p99 = by.p_ms(99.0);
                    eprintln!(
                        "the same {} releases of a module nobody calls: greeter's latency p99 during them {:.2} ms ({} requests, {} failed)",
                        e.bystander.len(),
                        by_p99,
                        by.requests,
                        by.failed
                    );
                    out.int("bystander_releases", e.bystander.len() as u64)
                        .num("latency_p99_during_bystander_release_ms", by_p99);
                }

                if let Some(r) = &e.aborted {
                    let ab = Summary::of(&e.aborted_records, |x| x.overlaps(&[r.window]));
                    eprintln!(
                        "broken deploy: outcome {} in {:.1} ms; requests during it {} ({} failed: {})",
                        r.times.outcome,
                        ms_of(r.times.total),
                        ab.requests,
                        ab.failed,
                        ab.failures_text()
                    );
                    out.str("aborted_deploy_outcome", &r.times.outcome)
                        .num("aborted_deploy_ms", ms_of(r.times.total))
                        .int("aborted_deploy_requests", ab.requests)
                        .int("aborted_deploy_failed_requests", ab.failed);
                    met &= r.times.outcome == "aborted" && ab.failed == 0;
                }
                if let Some(path) = chart(&a, e) {
                    eprintln!("chart: {}", path.display());
                }
            }
        }
    }
    match &cold {
        None => met = false,
        Some(Err(e)) => {
            eprintln!("cold baseline failed: {e}");
            out.str("cold_error", e);
            met = false;
        }
        Some(Ok(c)) => {
            let s = Summary::of(&c.records, |_| true);
            let cold_ms = ms_of(c.total);
            let mut init = c.plugin_init.clone();
            eprintln!(
                "cold replacement: {cold_ms:.0} ms (batches {}), plugin init p50 {:.0} ms; requests {} ({} failed: {}; {} retried)",
                c.batches
                    .iter()
                    .map(|b| format!("{:.0} ms", ms_of(*b)))
                    .collect::<Vec<_>>()
                    .join(" + "),
                if init.is_empty() { 0.0 } else { ms(init.percentile(50.0)) },
                s.requests,
                s.failed,
                s.failures_text(),
                s.retried
            );
            out.num("cold_deploy_ms", cold_ms)
                .int("cold_requests", s.requests)
                .int("cold_failed_requests", s.failed)
                .int("cold_retried_requests", s.retried)
                .num(
                    "cold_plugin_init_p50_ms",
                    if init.is_empty() {
                        0.0
                    } else {
                        ms(init.percentile(50.0))
                    },
                );
            match deploy_p50 {
                Some(d) if d > 0.0 => {
                    let ratio = cold_ms / d;
                    eprintln!("cold / deploy p50: {ratio:.1}x");
                    out.num("ratio_cold_over_deploy", ratio);
                    met &= ratio >= 20.0;
                }
                _ => met = false,
            }
            if let Some(path) = cold_chart(&a, c) {
                eprintln!("chart: {}", path.display());
            }
        }
    }
    eprintln!(
        "targets (no failed requests, rollbacks, service calls or aborted-deploy requests; cold/deploy >= 20; p99 during deploys <= 3x steady): {}",
        if met { "met" } else { "NOT met" }
    );
    out.bool("targets_met", met).int(
        "cpus",
        std::thread::available_parallelism().map_or(0, |n| n.get() as u64),
    );
    if json {
        println!("{}", out.render());
    }
}

/// `DIR/deploy.svg`: the deploy whose time is nearest the median, with the
/// requests around it and the replica counts emberd reported.
fn chart(a: &Args, e: &EmberOut) -> Option<PathBuf> {
    arg_value("--chart")?;
    let mut by: Vec<&Roll> = e
        .deploys
        .iter()
        .filter(|r| r.times.outcome == "completed")
        .collect();
    if by.is_empty() {
        return None;
    }
    by.sort_by_key(|r| r.times.done);
    let r = by[(by.len() - 1) / 2];
    let margin = Duration::from_millis(300);
    let from = r.window.0.saturating_sub(margin);
    let to = r.window.1 + margin;
    let call = r.window.0.as_secs_f64() * 1e3;
    let dots: Vec<Dot> = e
        .deploy_records
        .iter()
        .filter(|x| x.overlaps(&[(from, to)]))
        .map(|x| Dot {
            x_ms: x.start.as_secs_f64() * 1e3 - call,
            y_ms: ms_of(x.latency),
            failed: x.failure.is_some(),
        })
        .collect();
    let x0 = -(margin.as_secs_f64() * 1e3);
    let steps =
        |label: &str, color: &'static str, first: f64, f: fn(&RolloutProgress) -> u64| Steps {
            label: label.into(),
            color,
            points: std::iter::once((x0, first))
                .chain(
                    r.times
                        .progress
                        .iter()
                        .map(|pr| (ms_of(pr.at), f(pr) as f64)),
                )
                .collect(),
        };
    let mut markers = vec![Marker {
        x_ms: ms_of(r.times.total),
        label: format!("final reply ({})", r.times.outcome),
    }];
    if r.times.done < r.times.total {
        markers.push(Marker {
            x_ms: ms_of(r.times.done),
            label: "stabilizing".into(),
        });
    }
    if let Some(c) = r.times.cutover {
        markers.push(Marker {
            x_ms: ms_of(c),
            label: "all new ready".into(),
        });
    }
    ember_benches::write_chart(
        "deploy.svg",
        &svg::timeline(
            &format!(
                "Deploy of greeter ({} replicas) under load: {:.0} ms to stabilizing",
                a.replicas,
                ms_of(r.times.done)
            ),
            &format!("{}; {} HTTP clients", machine_summary(), a.clients),
            &dots,
            &[
                steps("old replicas", "#c0392b", a.replicas as f64, |p| {
                    p.old_replicas
                }),
                steps("new launched", "#f5b041", 0.0, |p| p.new_replicas),
                steps("new ready", "#27ae60", 0.0, |p| p.new_ready),
            ],
            &markers,
        ),
    )
}

/// `DIR/deploy-cold.svg`: the baseline's replacement, the same way.
fn cold_chart(a: &Args, c: &ColdOut) -> Option<PathBuf> {
    arg_value("--chart")?;
    let call = ms_of(c.origin);
    let dots: Vec<Dot> = c
        .records
        .iter()
        .map(|x| Dot {
            x_ms: x.start.as_secs_f64() * 1e3 - call,
            y_ms: ms_of(x.latency),
            failed: x.failure.is_some(),
        })
        .collect();
    ember_benches::write_chart(
        "deploy-cold.svg",
        &svg::timeline(
            &format!(
                "Baseline: {} standalone greeter processes replaced in two batches, {:.0} ms",
                a.replicas,
                ms_of(c.total)
            ),
            &format!("{}; {} HTTP clients", machine_summary(), a.clients),
            &dots,
            &[Steps {
                label: "replicas serving".into(),
                color: "#2471a3",
                points: c.serving.clone(),
            }],
            &[Marker {
                x_ms: ms_of(c.total),
                label: "all replaced".into(),
            }],
        ),
    )
}
