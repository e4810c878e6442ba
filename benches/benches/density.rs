//! Density benchmark: N running modules in one base whose plugin holds
//! 256 MiB of initialized data, against the naive alternative (one
//! standalone process per module, each initializing its own copy of the
//! plugin), in the same run.
//!
//! `cargo bench --bench density -- --json [--modules 200] [--naive 3]
//! [--plugin-mib 256] [--module hello|greeter] [--launcher emberd|zygote]
//! [--chart docs/img]`; `-- --chart docs/img --chart-from-json 'LINE'`
//! draws the chart from an earlier run's JSON line without running.
//!
//! Ember's modules are launched through a real `emberd` (`Install` over the
//! control socket); with `--launcher zygote` (or when emberd cannot run real
//! modules) this process is the zygote instead, and the JSON says so. The
//! naive alternative is measured on `--naive` processes and extrapolated to
//! N (`naive_measured` in the JSON).
//!
//! Per module: USS and PSS from `/proc/PID/smaps_rollup`; kernel overhead =
//! growth of `PageTables + KernelStack` in `/proc/meminfo` over the launch
//! / N (memory the kernel spends per process that no USS shows: a forked
//! worker used to copy the page tables of the plugin's inherited 256 MiB);
//! shared memory created = growth of `Shmem` / N (the catalog builds its
//! table in a sealed memfd, which a naive process creates for itself and
//! maps without touching again, so no RSS shows it; Ember's zygote created
//! it before the measured launches); host cost = USS + kernel overhead +
//! shared memory created. (A process that also read its own table would
//! count those pages twice; `hello` does not read it.) The raw drop of `MemAvailable` / N is
//! reported too (`mem_available_drop_per_module_kib`), but on a machine
//! where something else runs (a compiler) it is noise of ± hundreds of MiB.

use std::path::PathBuf;
use std::time::Duration;

use ember_benches::artifacts::{self, Stage, TempDir};
use ember_benches::daemon::{self, DaemonError, Emberd, Options};
use ember_benches::launch::{self, Base, Order, Worker};
use ember_benches::mem::{self, Rollup, UssBreakdown};
use ember_benches::svg::{self, Bar};
use ember_benches::{arg_num, arg_value, json_requested, machine_summary, JsonLine};

const TIMEOUT: Duration = Duration::from_secs(120);

/// What one launcher measured.
#[derive(Default)]
struct Measured {
    rollups: Vec<Rollup>,
    /// Sum over the measured processes.
    breakdown: UssBreakdown,
    page_tables_kib: u64,
    threads: usize,
    available_drop_kib: i64,
    kernel_growth_kib: i64,
    shmem_growth_kib: i64,
    base_rss_kib: u64,
    /// Shared memory the base created (the plugin's table).
    base_shmem_kib: u64,
}

impl Measured {
    fn n(&self) -> f64 {
        self.rollups.len().max(1) as f64
    }
    fn uss(&self) -> f64 {
        self.rollups.iter().map(|r| r.uss_kib).sum::<u64>() as f64 / self.n()
    }
    fn pss(&self) -> f64 {
        self.rollups.iter().map(|r| r.pss_kib).sum::<u64>() as f64 / self.n()
    }
    fn kernel(&self) -> f64 {
        self.kernel_growth_kib as f64 / self.n()
    }
    fn shmem(&self) -> f64 {
        self.shmem_growth_kib as f64 / self.n()
    }
    fn host_kib(&self) -> f64 {
        self.uss() + self.kernel() + self.shmem()
    }
    /// What the base itself holds: its RSS and the shared memory it made.
    fn base_kib(&self) -> f64 {
        (self.base_rss_kib + self.base_shmem_kib) as f64
    }
    fn available_drop(&self) -> f64 {
        self.available_drop_kib as f64 / self.n()
    }
    fn before(&mut self) -> u64 {
        self.kernel_growth_kib = -(mem::kernel_per_process_kib() as i64);
        self.shmem_growth_kib = -(mem::shmem_kib() as i64);
        mem::settled_available_kib()
    }
    fn after(&mut self, before: u64) {
        let after = mem::settled_available_kib();
        self.kernel_growth_kib += mem::kernel_per_process_kib() as i64;
        self.shmem_growth_kib += mem::shmem_kib() as i64;
        self.available_drop_kib = before as i64 - after as i64;
    }
    fn record(&mut self, pid: u32) {
        self.rollups.push(mem::rollup(pid).unwrap_or_default());
        self.breakdown
            .add(&mem::uss_breakdown(pid).unwrap_or_default());
        self.page_tables_kib += mem::page_tables_kib(pid).unwrap_or(0);
        self.threads += mem::threads(pid);
    }
}

fn main() {
    launch::run_cold_child_if_requested();
    if let Some(line) = arg_value("--chart-from-json") {
        redraw(&line);
        return;
    }
    let json = json_requested();
    let n = arg_num("--modules", 1000) as usize;
    let naive_n = arg_num("--naive", 3) as usize;
    let plugin_mib = arg_num("--plugin-mib", 256);
    let module = arg_value("--module").unwrap_or_else(|| "hello".into());
    let launcher = arg_value("--launcher").unwrap_or_else(|| "emberd".into());

    eprintln!("building catalog, {module} and emberd…");
    let profile = artifacts::build(&["catalog", &module], true)
        .unwrap_or_else(|e| panic!("{}", module_runtime::sdk::error_chain(&e)));
    let base = Base::catalog(&profile, plugin_mib);
    let tmp = TempDir::new("ember-bench-density").expect("temp dir");
    let artifact = artifacts::cdylib(&profile, &module);
    let stage = |i: Option<usize>| {
        let name = i.map_or_else(|| module.clone(), |i| format!("{module}-{i:03}"));
        let dir = tmp.path().join(&name);
        let manifest = artifacts::stage_module(
            &dir,
            &artifacts::example_manifest(&module),
            &artifact,
            &Stage {
                name: Some(name.clone()),
                replicas: Some(1),
                listen: Some("127.0.0.1:0".into()),
            },
        )
        .expect("stage module");
        (name, dir, manifest)
    };
    let (_, dir0, manifest0) = stage(None);
    let order = Order {
        artifact: dir0.join(artifact.file_name().expect("file name")),
        listeners: listeners(&manifest0),
        manifest: manifest0,
    };

    // The naive alternative first, while this process is still small.
    let exe = std::env::current_exe().expect("current exe");
    let mut naive = Measured::default();
    let before = naive.before();
    let mut procs: Vec<Worker> = Vec::new();
    for _ in 0..naive_n {
        let (w, _) = launch::cold_start(&exe, &base, &order, TIMEOUT).expect("naive process");
        procs.push(w);
    }
    naive.after(before);
    for w in &procs {
        naive.record(w.pid());
    }
    for w in procs {
        w.stop(Duration::from_secs(2));
    }
    eprintln!(
        "naive: {naive_n} processes, USS {:.0} KiB, PSS {:.0} KiB, host {:.1} MiB per module",
        naive.uss(),
        naive.pss(),
        naive.host_kib() / 1024.0
    );

    let mut used = launcher.clone();
    let mut emberd_error = None;
    let ember = if launcher == "emberd" {
        let names: Vec<(String, PathBuf)> = (0..n)
            .map(|i| {
                let (name, dir, _) = stage(Some(i));
                (name, dir)
            })
            .collect();
        match artifacts::build(&["supervisor"], true)
            .map_err(|e| module_runtime::sdk::error_chain(&e))
            .and_then(|p| {
                through_emberd(&daemon::emberd_bin(&p), &base, &names)
                    .map_err(|e| module_runtime::sdk::error_chain(&e))
            }) {
            Ok(m) => Some(m),
            Err(e) => {
                eprintln!("emberd failed, falling back to this process as the zygote: {e}");
                emberd_error = Some(e);
                None
            }
        }
    } else {
        None
    };
    let ember = ember.unwrap_or_else(|| {
        used = "zygote".into();
        through_zygote(&base, &order, n)
    });

    let total_kib = mem::meminfo_kib("MemTotal") as f64;
    let fit = |host_kib: f64, base_kib: f64| ((total_kib - base_kib) / host_kib).floor();
    let ember_fit = fit(ember.host_kib().max(1.0), ember.base_kib());
    let naive_fit = fit(naive.host_kib().max(1.0), 0.0);
    let kernel = ember.kernel();
    eprintln!(
        "ember ({used}): {n} modules, USS {:.0} KiB, PSS {:.0} KiB, kernel {kernel:.0} KiB, host {:.2} MiB per module (MemAvailable drop {:.0} KiB); page tables {:.0} KiB, {:.1} threads per module",
        ember.uss(),
        ember.pss(),
        ember.host_kib() / 1024.0,
        ember.available_drop(),
        ember.page_tables_kib as f64 / ember.n(),
        ember.threads as f64 / ember.n()
    );
    eprintln!(
        "fit in {:.1} GiB: ember {ember_fit:.0} modules, naive {naive_fit:.0}; naive/ember host memory {:.0}x",
        total_kib / 1048576.0,
        naive.host_kib() / ember.host_kib()
    );
    let per = |kib: u64| kib as f64 / ember.n();
    eprintln!(
        "USS per module by mapping (KiB): {}",
        ember
            .breakdown
            .fields()
            .iter()
            .map(|(k, v)| format!("{k} {:.0}", per(*v)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut out = JsonLine::default();
    out.int("modules", n as u64)
        .int("modules_measured", ember.rollups.len() as u64)
        .str("launcher", &used)
        .str("module", &module)
        .int("base_plugin_mib", plugin_mib)
        .num("base_rss_mib", ember.base_rss_kib as f64 / 1024.0)
        .num("base_shmem_mib", ember.base_shmem_kib as f64 / 1024.0)
        .num("uss_per_module_kib", ember.uss())
        .num("pss_per_module_kib", ember.pss());
    for (k, v) in ember.breakdown.fields() {
        out.num(&format!("uss_{k}_kib"), per(v));
    }
    out.num("kernel_overhead_per_module_kib", kernel)
        .num("shmem_created_per_module_kib", ember.shmem())
        .num(
            "page_tables_per_module_kib",
            ember.page_tables_kib as f64 / ember.n(),
        )
        .num("threads_per_module", ember.threads as f64 / ember.n())
        .num("host_mib_per_module", ember.host_kib() / 1024.0)
        .num("mem_available_drop_per_module_kib", ember.available_drop())
        .num("modules_fit_in_ram", ember_fit)
        .int("naive_measured", naive.rollups.len() as u64)
        .bool("naive_extrapolated", true)
        .num("naive_uss_per_module_kib", naive.uss())
        .num("naive_pss_per_module_kib", naive.pss())
        .num("naive_kernel_overhead_per_module_kib", naive.kernel())
        .num("naive_shmem_created_per_module_kib", naive.shmem())
        .num("naive_host_mib_per_module", naive.host_kib() / 1024.0)
        .num(
            "naive_mem_available_drop_per_module_kib",
            naive.available_drop(),
        )
        .num("naive_modules_fit_in_ram", naive_fit)
        .num(
            "naive_total_gib_for_n",
            naive.host_kib() * n as f64 / 1048576.0,
        )
        .num(
            "ember_total_gib_for_n",
            (ember.host_kib() * n as f64 + ember.base_kib()) / 1048576.0,
        )
        .num(
            "ratio_naive_over_ember_per_module",
            naive.host_kib() / ember.host_kib(),
        )
        .num("ram_gib", total_kib / 1048576.0)
        .bool(
            "targets_met",
            ember.uss() <= 256.0
                && ember.rollups.len() >= 1000
                && ember_fit >= 500.0
                && used == "emberd",
        );
    if let Some(e) = &emberd_error {
        out.str("emberd_error", e);
    }
    let svg = chart(&Figures {
        plugin_mib,
        modules: n as u64,
        uss_mib: ember.uss() / 1024.0,
        host_mib: ember.host_kib() / 1024.0,
        naive_host_mib: naive.host_kib() / 1024.0,
        ram_gib: total_kib / 1048576.0,
        fit: ember_fit,
        naive_fit,
    });
    if let Some(p) = ember_benches::write_chart("density.svg", &svg) {
        eprintln!("chart: {}", p.display());
    }
    drop(tmp);
    if json {
        println!("{}", out.render());
    }
}

/// What the chart shows, from a run or from its JSON line.
struct Figures {
    plugin_mib: u64,
    modules: u64,
    uss_mib: f64,
    host_mib: f64,
    naive_host_mib: f64,
    ram_gib: f64,
    fit: f64,
    naive_fit: f64,
}

/// `density.svg`. The count of modules that fit is memory's alone: emberd's
/// descriptors (about three per module, under its `RLIMIT_NOFILE`), pids
/// and threads are other limits, which the chart says.
fn chart(f: &Figures) -> String {
    let bar = |label: &str, value: f64, color: &'static str| Bar {
        label: label.into(),
        value,
        color,
    };
    svg::bar_panels(
        &format!(
            "Memory per module: Ember vs a process each ({} MiB plugin, {} modules)",
            f.plugin_mib, f.modules
        ),
        &machine_summary(),
        &[
            (
                "host memory per module (MiB, lower is better)",
                "MiB",
                vec![
                    bar("Ember: USS", f.uss_mib, "#5dade2"),
                    bar("Ember: USS + kernel", f.host_mib, "#2471a3"),
                    bar("naive: own plugin copy", f.naive_host_mib, "#c0392b"),
                ],
            ),
            (
                &format!(
                    "modules whose memory fits in {:.0} GiB (memory only; higher is better)",
                    f.ram_gib
                ),
                "modules",
                vec![
                    bar("Ember", f.fit.floor(), "#2471a3"),
                    bar("naive", f.naive_fit.floor(), "#c0392b"),
                ],
            ),
        ],
        &[
            "Memory only: RAM less the base, over each module's host memory. Descriptors (emberd",
            "holds about 3 per module, under its RLIMIT_NOFILE), pids and threads are separate limits.",
        ],
    )
}

/// `--chart-from-json LINE --chart DIR`: draws `density.svg` from the JSON
/// line of an earlier run (the one the README quotes) without running
/// anything. The subtitle names this machine.
fn redraw(line: &str) {
    let v: serde_json::Value = serde_json::from_str(line).expect("--chart-from-json: a JSON line");
    let num = |k: &str| {
        v[k].as_f64()
            .unwrap_or_else(|| panic!("--chart-from-json: no number `{k}`"))
    };
    let svg = chart(&Figures {
        plugin_mib: num("base_plugin_mib") as u64,
        modules: num("modules") as u64,
        uss_mib: num("uss_per_module_kib") / 1024.0,
        host_mib: num("host_mib_per_module"),
        naive_host_mib: num("naive_host_mib_per_module"),
        ram_gib: num("ram_gib"),
        fit: num("modules_fit_in_ram"),
        naive_fit: num("naive_modules_fit_in_ram"),
    });
    match ember_benches::write_chart("density.svg", &svg) {
        Some(p) => eprintln!("chart: {}", p.display()),
        None => eprintln!("--chart-from-json needs --chart DIR"),
    }
}

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

fn through_emberd(
    bin: &std::path::Path,
    base: &Base,
    modules: &[(String, PathBuf)],
) -> Result<Measured, DaemonError> {
    let shmem_before = mem::shmem_kib();
    let mut d = Emberd::start(
        bin,
        &Options {
            base: Some(base.clone()),
            ..Options::default()
        },
    )?;
    d.set_poll_interval(Duration::from_micros(500));
    d.wait_pool_idle(2, TIMEOUT)?;
    let zygote = d.call("Health", serde_json::json!({}))?["zygote_pid"]
        .as_u64()
        .unwrap_or(0) as u32;
    let mut m = Measured {
        base_rss_kib: mem::rollup(zygote).map_or(0, |r| r.rss_kib),
        base_shmem_kib: mem::shmem_kib().saturating_sub(shmem_before),
        ..Measured::default()
    };
    let before = m.before();
    let mut pids = Vec::new();
    for (i, (name, dir)) in modules.iter().enumerate() {
        d.install(dir)?;
        let s = d.wait_running(name, TIMEOUT)?;
        let pid = s["pid"].as_u64().unwrap_or(0) as u32;
        if i == 0 && !daemon::runs_module_artifact(pid, d.state_dir()) {
            return Err(DaemonError::ModuleFailed {
                name: name.clone(),
                state: "running".into(),
                reason: format!("pid {pid} has not loaded the module's artifact"),
            });
        }
        pids.push(pid);
    }
    // Same number of idle workers as before the launches.
    d.wait_pool_idle(2, TIMEOUT)?;
    m.after(before);
    for &p in &pids {
        m.record(p);
    }
    d.stop(Duration::from_secs(30));
    let left: Vec<u32> = pids.into_iter().filter(|&p| mem::alive(p)).collect();
    assert!(
        left.is_empty(),
        "workers left after emberd stopped: {left:?}"
    );
    Ok(m)
}

fn through_zygote(base: &Base, order: &Order, n: usize) -> Measured {
    let shmem_before = mem::shmem_kib();
    launch::zygote_load(base).expect("load the plugin into this process");
    let mut m = Measured {
        base_rss_kib: mem::rollup(std::process::id()).map_or(0, |r| r.rss_kib),
        base_shmem_kib: mem::shmem_kib().saturating_sub(shmem_before),
        ..Measured::default()
    };
    let before = m.before();
    let mut ws = Vec::with_capacity(n);
    for _ in 0..n {
        let mut w = launch::zygote_fork(TIMEOUT).expect("fork");
        w.launch(order, TIMEOUT).expect("launch");
        ws.push(w);
    }
    m.after(before);
    for w in &ws {
        m.record(w.pid());
    }
    for w in ws {
        w.stop(Duration::from_secs(2));
    }
    m
}
