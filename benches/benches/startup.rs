//! Start-up benchmark, all on the demo base (the `catalog` plugin with its
//! default 200 MiB table and init work), in one run:
//!
//! - cold start: a fresh process (this binary re-executed) initializes the
//!   plugin, then loads the module, until the module reports ready;
//! - warm launch: `Install` over emberd's control socket until `Status` says
//!   `running`, with a warm idle worker available (real emberd);
//! - launch with no idle worker: the same against an emberd with an empty
//!   pool (fork on the critical path);
//! - CRI start: as the kubelet starts a container, over containerd's CRI
//!   (a private containerd, `containerd-shim-ember-v1`, a module image made
//!   by `emberctl pack`, host network): CreateContainer + StartContainer
//!   until the module is ready, pool warm; beside it emberd's
//!   `RunContainer` of the same directory alone, and the pod sandbox's
//!   start (its shim process). Needs root and containerd, like the
//!   Kubernetes tests; without them the JSON line says why in `cri_error`;
//! - limit: this process as the zygote, no supervisor: fork → `Idle` →
//!   `Launch` → sandbox → dlopen → module init → `Ready`, the worker
//!   applying the same sandbox as emberd's (none with
//!   `EMBER_BENCH_SANDBOX=off`, which turns emberd's off too).
//!
//! `cargo bench --bench startup -- --json [--chart docs/img] [--module
//! greeter|hello] [--cold N] [--warm N] [--no-idle N] [--cri N] [--limit N]
//! [--catalog-mb MB]` prints human-readable lines on stderr, then one JSON
//! object as the last line on stdout. `-- --chart docs/img --redraw` draws
//! the chart again from the samples it shows, without running.

use std::path::Path;
use std::time::{Duration, Instant};

use ember_benches::artifacts::{self, Stage, TempDir};
use ember_benches::daemon::{self, DaemonError, Emberd, Options};
use ember_benches::launch::{self, Base, Order};
use ember_benches::svg::{self, Series};
use ember_benches::{arg_num, arg_value, json_requested, machine_summary, ms, JsonLine, Samples};

const TIMEOUT: Duration = Duration::from_secs(120);
const STOP: Duration = Duration::from_secs(2);

struct Daemon {
    warm: Samples,
    warm_reply: Samples,
    no_idle: Samples,
    hits: u64,
    misses: u64,
}

fn main() {
    launch::run_cold_child_if_requested();
    if std::env::args().any(|a| a == "--redraw") {
        redraw();
        return;
    }
    let json = json_requested();
    let module = arg_value("--module").unwrap_or_else(|| "greeter".into());
    let n_cold = arg_num("--cold", 8) as usize;
    let n_warm = arg_num("--warm", 100) as usize;
    let n_no_idle = arg_num("--no-idle", 30) as usize;
    let n_limit = arg_num("--limit", 100) as usize;
    let n_cri = arg_num("--cri", 30) as usize;
    let catalog_mb = arg_num("--catalog-mb", 200);

    eprintln!("building catalog, {module} and emberd…");
    let profile = artifacts::build(&["catalog", &module], true)
        .unwrap_or_else(|e| panic!("{}", module_runtime::sdk::error_chain(&e)));
    let built_emberd = artifacts::build(&["supervisor"], true);
    let base = Base::catalog(&profile, catalog_mb);
    let tmp = TempDir::new("ember-bench-startup").expect("temp dir");
    let mod_dir = tmp.path().join(&module);
    let manifest = artifacts::stage_module(
        &mod_dir,
        &artifacts::example_manifest(&module),
        &artifacts::cdylib(&profile, &module),
        &Stage {
            name: None,
            replicas: Some(1),
            listen: Some("127.0.0.1:0".into()),
        },
    )
    .expect("stage module");
    let order = Order {
        artifact: mod_dir.join(format!("lib{module}.so")),
        manifest: manifest.clone(),
        listeners: listeners(&manifest),
    };
    let exe = std::env::current_exe().expect("current exe");

    // 1. Cold starts: a fresh process per sample.
    let mut cold = Samples::with_capacity(n_cold);
    let mut cold_init = Samples::with_capacity(n_cold);
    for _ in 0..n_cold {
        let (w, t) = launch::cold_start(&exe, &base, &order, TIMEOUT).expect("cold start");
        cold.push(t.ready);
        cold_init.push(t.idle);
        w.stop(STOP);
    }
    eprintln!(
        "cold start        p50 {:.1} ms (plugin init p50 {:.1} ms), n={n_cold}",
        ms(cold.percentile(50.0)),
        ms(cold_init.percentile(50.0))
    );

    // 2 and 3. Through real emberd.
    let through_emberd = match &built_emberd {
        Ok(_) => run_emberd(
            &daemon::emberd_bin(&profile),
            &base,
            &mod_dir,
            &module,
            n_warm,
            n_no_idle,
        )
        .map_err(|e| module_runtime::sdk::error_chain(&e)),
        Err(e) => Err(module_runtime::sdk::error_chain(e)),
    };
    if let Err(e) = &through_emberd {
        eprintln!("emberd phases failed: {e}");
    }

    // 4. As the kubelet starts a container: CRI through a private
    // containerd and the shim into emberd's warm pool.
    let mut cri = match &built_emberd {
        Ok(_) => cri::run(&daemon::emberd_bin(&profile), &base, &mod_dir, n_cri),
        Err(e) => Err(module_runtime::sdk::error_chain(e)),
    };
    match &mut cri {
        Ok(c) => eprintln!(
            "CRI start         p50 {:.3} ms p99 {:.3} ms, n={} (emberd RunContainer alone p50 {:.3} ms; pod sandbox with its shim {:.1} ms)",
            ms(c.start.percentile(50.0)),
            ms(c.start.percentile(99.0)),
            c.start.len(),
            ms(c.run_container.percentile(50.0)),
            c.sandbox.as_secs_f64() * 1e3
        ),
        Err(e) => eprintln!("CRI phase failed: {e}"),
    }

    // 5. The floor: this process is the zygote (still single-threaded), its
    // workers apply the same sandbox as emberd's.
    launch::zygote_load(&base).expect("load the plugin into the bench process");
    let sandbox = launch::sandbox_like_emberd();
    let mut limit = Samples::with_capacity(n_limit);
    let mut limit_warm = Samples::with_capacity(n_limit);
    for i in 0..n_limit + 5 {
        let t = Instant::now();
        let mut w = launch::zygote_fork(TIMEOUT).expect("fork");
        w.launch_sandboxed(&order, sandbox.clone(), TIMEOUT)
            .expect("launch");
        let d = t.elapsed();
        w.stop(STOP);
        // The same into an already warm worker (fork off the clock).
        let mut w = launch::zygote_fork(TIMEOUT).expect("fork");
        let t = Instant::now();
        w.launch_sandboxed(&order, sandbox.clone(), TIMEOUT)
            .expect("launch");
        let dw = t.elapsed();
        w.stop(STOP);
        if i >= 5 {
            limit.push(d);
            limit_warm.push(dw);
        }
    }

    let (c50, c99) = (ms(cold.percentile(50.0)), ms(cold.percentile(99.0)));
    let (l50, l99) = (ms(limit.percentile(50.0)), ms(limit.percentile(99.0)));
    let lw50 = ms(limit_warm.percentile(50.0));
    let mut out = JsonLine::default();
    out.str("module", &module)
        .int("catalog_mb", catalog_mb)
        .int("cold_samples", cold.len() as u64)
        .num("cold_start_p50_ms", c50)
        .num("cold_start_p99_ms", c99)
        .num("cold_plugin_init_p50_ms", ms(cold_init.percentile(50.0)));
    let mut series = vec![Series {
        label: format!("cold start ({module})"),
        ms: cold.ms(),
        color: "#c0392b",
    }];
    let mut met = false;
    match through_emberd {
        Ok(mut d) => {
            let (w50, w99) = (ms(d.warm.percentile(50.0)), ms(d.warm.percentile(99.0)));
            let n50 = ms(d.no_idle.percentile(50.0));
            let ratio = c50 / w50;
            met = w50 <= 1.5 && w99 <= 5.0 && w50 <= 1.25 * l50 && ratio >= 100.0;
            eprintln!("warm launch       p50 {w50:.3} ms p99 {w99:.3} ms (Install reply p50 {:.3} ms), n={} (pool hits {} misses {})",
                ms(d.warm_reply.percentile(50.0)), d.warm.len(), d.hits, d.misses);
            eprintln!(
                "launch, no idle   p50 {n50:.3} ms p99 {:.3} ms, n={}",
                ms(d.no_idle.percentile(99.0)),
                d.no_idle.len()
            );
            eprintln!("limit (zygote)    p50 {l50:.3} ms p99 {l99:.3} ms; into a warm worker p50 {lw50:.3} ms, n={n_limit}");
            eprintln!(
                "cold/warm {ratio:.0}x, warm/limit {:.2}x; targets (warm p50 <= 1.5 ms, p99 <= 5 ms, <= 1.25x limit, ratio >= 100): {}",
                w50 / l50,
                if met { "met" } else { "NOT met" }
            );
            out.int("warm_samples", d.warm.len() as u64)
                .num("warm_launch_p50_ms", w50)
                .num("warm_launch_p99_ms", w99)
                .num(
                    "warm_install_reply_p50_ms",
                    ms(d.warm_reply.percentile(50.0)),
                )
                .int("warm_pool_hits", d.hits)
                .int("warm_pool_misses", d.misses)
                .int("no_idle_samples", d.no_idle.len() as u64)
                .num("launch_no_idle_p50_ms", n50)
                .num("launch_no_idle_p99_ms", ms(d.no_idle.percentile(99.0)));
            series.push(Series {
                label: "launch, empty pool".into(),
                ms: d.no_idle.ms(),
                color: "#e67e22",
            });
            series.push(Series {
                label: "warm launch (emberd)".into(),
                ms: d.warm.ms(),
                color: "#2471a3",
            });
            out.num("limit_p50_ms", l50)
                .num("limit_p99_ms", l99)
                .int("limit_samples", limit.len() as u64)
                .num("limit_warm_worker_p50_ms", lw50)
                .bool("limit_sandboxed", sandbox.is_some())
                .num("ratio_cold_over_warm", ratio)
                .num("ratio_warm_over_limit", w50 / l50)
                .bool("warm_over_limit_target_met", w50 <= 1.25 * l50);
        }
        Err(e) => {
            eprintln!("limit (zygote)    p50 {l50:.3} ms p99 {l99:.3} ms; into a warm worker p50 {lw50:.3} ms, n={n_limit}");
            out.num("limit_p50_ms", l50)
                .num("limit_p99_ms", l99)
                .int("limit_samples", limit.len() as u64)
                .num("limit_warm_worker_p50_ms", lw50)
                .num("ratio_cold_over_limit", c50 / l50)
                .str("emberd_error", &e);
        }
    }
    match cri {
        Ok(mut c) => {
            let (p50, p99) = (ms(c.start.percentile(50.0)), ms(c.start.percentile(99.0)));
            let rc50 = ms(c.run_container.percentile(50.0));
            out.int("cri_samples", c.start.len() as u64)
                .num("cri_start_p50_ms", p50)
                .num("cri_start_p99_ms", p99)
                .num("cri_run_container_p50_ms", rc50)
                .num("cri_overhead_p50_ms", p50 - rc50)
                .num("cri_sandbox_start_ms", c.sandbox.as_secs_f64() * 1e3)
                .num("ratio_cold_over_cri", c50 / p50)
                .bool("cri_target_met", c50 / p50 >= 10.0);
            met = met && c50 / p50 >= 10.0;
            series.push(Series {
                label: "CRI create+start (containerd, shim)".into(),
                ms: c.start.ms(),
                color: "#8e44ad",
            });
        }
        Err(e) => {
            out.str("cri_error", &e);
            met = false;
        }
    }
    series.push(Series {
        label: "limit: zygote fork+launch".into(),
        ms: limit.ms(),
        color: "#27ae60",
    });
    out.bool("targets_met", met).int(
        "cpus",
        std::thread::available_parallelism().map_or(0, |n| n.get() as u64),
    );
    if let Some(p) = ember_benches::write_chart(
        "startup.svg",
        &svg::distribution(
            &format!("Module start-up: cold process vs warm launch ({module}, {catalog_mb} MiB catalog plugin)"),
            &machine_summary(),
            &series,
        ),
    ) {
        eprintln!("chart: {}", p.display());
    }
    drop(tmp);
    if json {
        println!("{}", out.render());
    }
}

/// `--redraw --chart DIR`: draws `DIR/startup.svg` again with the current
/// layout from the samples it shows ([`svg::read_distribution`]), without
/// running anything: the samples of a run are kept nowhere else.
fn redraw() {
    let Some(dir) = arg_value("--chart") else {
        panic!("--redraw needs --chart DIR");
    };
    let path = artifacts::workspace_root().join(dir).join("startup.svg");
    let old = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("--redraw: {}: {e}", path.display()));
    let (title, subtitle, series) = svg::read_distribution(&old)
        .unwrap_or_else(|| panic!("--redraw: {} is not a start-up chart", path.display()));
    if let Some(p) = ember_benches::write_chart(
        "startup.svg",
        &svg::distribution(&title, &subtitle, &series),
    ) {
        eprintln!("chart: {}", p.display());
    }
}

/// Names of the manifest's `[[listeners]]`.
fn listeners(manifest: &str) -> Vec<String> {
    let t: toml::Table = toml::from_str(manifest).expect("staged manifest");
    t.get("listeners")
        .and_then(toml::Value::as_array)
        .map(|ls| {
            ls.iter()
                .filter_map(|l| l.get("name")?.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Installs `name` from `dir`, waits until it runs, uninstalls it; returns
/// (Install → running, Install reply) and checks the worker really loaded
/// the module when `verify`.
fn launch_once(
    d: &mut Emberd,
    dir: &Path,
    name: &str,
    verify: bool,
) -> Result<(Duration, Duration), DaemonError> {
    let (total, reply) = d.install_until_running(dir, name, TIMEOUT)?;
    if verify {
        let status = d.status(name)?;
        let pid = status["pid"].as_u64().unwrap_or(0) as u32;
        if !daemon::runs_module_artifact(pid, d.state_dir()) {
            return Err(DaemonError::ModuleFailed {
                name: name.into(),
                state: "running".into(),
                reason: format!(
                    "emberd reports it running in pid {pid}, but that process has not loaded the module's artifact (stand-in worker?)"
                ),
            });
        }
    }
    d.uninstall(name)?;
    Ok((total, reply))
}

/// The CRI phase: what a pod's container start costs on a node whose
/// containerd runs modules through `containerd-shim-ember-v1`.
mod cri {
    use std::panic::AssertUnwindSafe;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use ember_benches::daemon::{Emberd, Options};
    use ember_benches::launch::Base;
    use ember_benches::Samples;
    use ember_tests::containerd::{shim, Containerd, Cri, PAUSE_IMAGE};
    use ember_tests::oci;
    use serde_json::json;

    use super::TIMEOUT;

    /// Timings of the CRI phase.
    pub struct Timings {
        /// CreateContainer + StartContainer (StartContainer answers once the
        /// module is ready), pool warm.
        pub start: Samples,
        /// emberd's `RunContainer` of the same module directory, called
        /// directly (no containerd, no shim, no image): what is left of a
        /// container start without the container runtime.
        pub run_container: Samples,
        /// RunPodSandbox of the pod the samples run in: starts the pod's
        /// shim process (the pause container is no process).
        pub sandbox: Duration,
    }

    /// Runs the phase; the harness's panics (containerd missing, not root…)
    /// become the error the JSON line reports.
    pub fn run(bin: &Path, base: &Base, dir: &Path, n: usize) -> Result<Timings, String> {
        match std::panic::catch_unwind(AssertUnwindSafe(|| measure(bin, base, dir, n))) {
            Ok(r) => r,
            Err(p) => Err(p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "the CRI harness panicked".into())),
        }
    }

    fn measure(bin: &Path, base: &Base, dir: &Path, n: usize) -> Result<Timings, String> {
        let err = |e: ember_benches::daemon::DaemonError| module_runtime::sdk::error_chain(&e);
        let mut d = Emberd::start(
            bin,
            &Options {
                base: Some(base.clone()),
                ..Options::default()
            },
        )
        .map_err(err)?;
        d.wait_pool_idle(2, TIMEOUT).map_err(err)?;

        // emberd alone: RunContainer of the module directory.
        let mut run_container = Samples::with_capacity(n);
        for i in 0..n + 3 {
            d.wait_pool_idle(2, TIMEOUT).map_err(err)?;
            std::thread::sleep(Duration::from_millis(30));
            let id = format!("bench-direct-{i}");
            let t = Instant::now();
            d.call("RunContainer", json!({ "id": id, "path": dir }))
                .map_err(err)?;
            let took = t.elapsed();
            d.call("RemoveContainer", json!({ "id": id }))
                .map_err(err)?;
            if i >= 3 {
                run_container.push(took);
            }
        }

        // The shim, built into this profile's target dir, where the
        // harness's containerd finds it.
        shim();
        let ctd = Containerd::start(d.socket());
        let pause = oci::pause(PAUSE_IMAGE, &ctd.dir.path().join("pause.tar"));
        ctd.import(&pause.archive);
        let img = oci::pack(
            dir,
            "ember.local/bench-module:0.1.0",
            &ctd.dir.path().join("module.tar"),
        );
        ctd.import(&img.archive);
        let mut cri = Cri::start(&ctd);
        let logs = ctd.log_dir().join("bench");
        std::fs::create_dir_all(&logs).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let sb = cri.ok(
            "run_sandbox",
            json!({ "name": "bench", "log_dir": logs, "handler": "ember", "network": "node" }),
        )["id"]
            .as_str()
            .expect("sandbox id")
            .to_owned();
        let sandbox = t.elapsed();
        ctd.track_shim(&sb);

        let mut start = Samples::with_capacity(n);
        for i in 0..n + 3 {
            d.wait_pool_idle(2, TIMEOUT).map_err(err)?;
            std::thread::sleep(Duration::from_millis(30));
            let name = format!("bench-{i}");
            let t = Instant::now();
            let cid = cri.ok(
                "create",
                json!({ "sandbox": sb, "name": name, "image": img.reference }),
            )["id"]
                .as_str()
                .expect("container id")
                .to_owned();
            cri.ok("start", json!({ "container": cid }));
            let took = t.elapsed();
            cri.ok("stop", json!({ "container": cid, "timeout": 5 }));
            cri.ok("remove", json!({ "container": cid }));
            if i >= 3 {
                start.push(took);
            }
        }
        cri.ok("stop_sandbox", json!({ "sandbox": sb }));
        cri.ok("remove_sandbox", json!({ "sandbox": sb }));
        drop(cri);
        drop(ctd);
        d.stop(Duration::from_secs(15));
        Ok(Timings {
            start,
            run_container,
            sandbox,
        })
    }
}

fn run_emberd(
    bin: &Path,
    base: &Base,
    dir: &Path,
    name: &str,
    n_warm: usize,
    n_no_idle: usize,
) -> Result<Daemon, DaemonError> {
    let mut warm = Samples::with_capacity(n_warm);
    let mut warm_reply = Samples::with_capacity(n_warm);
    let mut d = Emberd::start(
        bin,
        &Options {
            base: Some(base.clone()),
            ..Options::default()
        },
    )?;
    d.wait_pool_idle(2, TIMEOUT)?;
    let before = d.pool()?;
    for i in 0..n_warm + 3 {
        // Every sample starts from a pool at rest: refilled to `min_idle`
        // (no refill fork competing with the launch), and the previous
        // sample's worker has finished exiting.
        d.wait_pool_idle(2, TIMEOUT)?;
        std::thread::sleep(Duration::from_millis(30));
        let (t, r) = launch_once(&mut d, dir, name, i == 0)?;
        if i >= 3 {
            warm.push(t);
            warm_reply.push(r);
        }
    }
    let after = d.pool()?;
    let delta = |k: &str| after[k].as_u64().unwrap_or(0) - before[k].as_u64().unwrap_or(0);
    let (hits, misses) = (delta("hits"), delta("misses"));
    d.stop(Duration::from_secs(15));
    drop(d);

    let mut no_idle = Samples::with_capacity(n_no_idle);
    let mut d = Emberd::start(
        bin,
        &Options {
            base: Some(base.clone()),
            min_idle: 0,
            max_idle: 0,
            ..Options::default()
        },
    )?;
    for i in 0..n_no_idle + 2 {
        let (t, _) = launch_once(&mut d, dir, name, i == 0)?;
        if i >= 2 {
            no_idle.push(t);
        }
    }
    Ok(Daemon {
        warm,
        warm_reply,
        no_idle,
        hits,
        misses,
    })
}
