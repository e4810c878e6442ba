//! `/metrics`: a real emberd with `--metrics`, running a module with two
//! replicas (one killed, to be restarted), scraped over a real TCP socket
//! and parsed with a Prometheus text parser (`prometheus-parse`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use ember_tests::daemon::*;
use ember_tests::{poll_until, TempDir};
use prometheus_parse::{Sample, Scrape, Value};

/// A port no one listens on right now.
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// emberd with `--metrics ADDR` on a free port (another port is tried if
/// something took it between the probe and the bind).
fn start_with_metrics(config: &str) -> (Daemon, SocketAddr) {
    let mut d = Daemon::in_dir(TempDir::new("m"), config);
    for _ in 0..5 {
        let addr = free_addr();
        let mut child = Command::new(emberd())
            .arg("--config")
            .arg(&d.config)
            .arg("--socket")
            .arg(&d.socket)
            .arg("--state-dir")
            .arg(&d.state)
            .arg("--metrics")
            .arg(addr.to_string())
            .env("EMBER_LOG", "error")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let up = poll_until("emberd's socket", Duration::from_millis(20), || {
            if let Some(st) = child.try_wait().unwrap() {
                return Ok(Some(st));
            }
            std::os::unix::net::UnixStream::connect(&d.socket)
                .map(|_| None)
                .map_err(|e| e.to_string())
        });
        match up {
            None => {
                d.child = Some(child);
                return (d, addr);
            }
            // 69: the port was taken meanwhile.
            Some(st) if st.code() == Some(69) => continue,
            Some(st) => panic!("emberd exited early: {st}"),
        }
    }
    panic!("no free port for --metrics");
}

/// One HTTP/1.1 request: status code, headers (lower-case names), body.
fn http(addr: SocketAddr, request: &str) -> (u16, HashMap<String, String>, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(request.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap();
    assert!(status.starts_with("HTTP/1.1 "), "{status}");
    let code = status[9..12].parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_owned()))
        .collect::<HashMap<_, _>>();
    assert_eq!(
        headers["content-length"].parse::<usize>().unwrap(),
        body.len()
    );
    (code, headers, body.to_owned())
}

fn scrape(addr: SocketAddr) -> Scrape {
    let (code, headers, body) = http(addr, "GET /metrics HTTP/1.1\r\nHost: ember\r\n\r\n");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        headers["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let sc = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).unwrap();
    // Prometheus refuses a scrape with a series twice.
    let mut seen = std::collections::HashSet::new();
    for s in &sc.samples {
        assert!(
            seen.insert(format!("{}{{{}}}", s.metric, s.labels)),
            "duplicate series {} {}",
            s.metric,
            s.labels
        );
    }
    sc
}

fn value(s: &Sample) -> f64 {
    match &s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
        other => panic!("{} is not a single value: {other:?}", s.metric),
    }
}

/// Samples of `metric` whose labels include `labels`.
fn samples<'a>(sc: &'a Scrape, metric: &str, labels: &[(&str, &str)]) -> Vec<&'a Sample> {
    sc.samples
        .iter()
        .filter(|s| s.metric == metric)
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .collect()
}

/// The one sample of `metric` with `labels`.
fn one(sc: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    let s = samples(sc, metric, labels);
    assert_eq!(s.len(), 1, "{metric}{labels:?}: {s:?}");
    value(s[0])
}

fn sum(sc: &Scrape, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(sc, metric, labels).into_iter().map(value).sum()
}

#[test]
fn a_scrape_shows_every_family_of_a_running_daemon() {
    let (d, addr) = start_with_metrics(FAST);
    let m = real_module(d.dir.path(), "hello", "hello", "replicas = 2\n");
    d.ctl_ok(&["install", m.to_str().unwrap()]);
    let both_running = |s: &serde_json::Value| {
        s["replicas"]
            .as_array()
            .is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["state"] == "running"))
    };
    let s = d.wait_status("hello", "two replicas running", both_running);
    let victim = s["replicas"][0]["pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(victim),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.wait_status("hello", "replica 0 restarted", |s| {
        both_running(s) && s["replicas"][0]["pid"].as_i64() != Some(victim as i64)
    });
    // Control calls to find counted: two List, one Status of a module
    // that does not exist.
    d.ctl_ok(&["list"]);
    d.ctl_ok(&["list"]);
    assert_eq!(d.ctl(&["status", "nope"]).status.code(), Some(3));

    let sc = scrape(addr);
    let hello = [("module", "hello")];

    // Daemon.
    assert_eq!(one(&sc, "ember_build_info", &[]), 1.0);
    assert!(one(&sc, "ember_uptime_seconds", &[]) > 0.0);
    assert!(one(&sc, "ember_start_time_seconds", &[]) > 1.6e9);
    assert!(
        one(
            &sc,
            "ember_control_calls_total",
            &[("method", "io.ember.Supervisor.List")]
        ) >= 2.0
    );
    assert!(
        one(
            &sc,
            "ember_control_errors_total",
            &[
                ("method", "io.ember.Supervisor.Status"),
                ("error", "io.ember.Supervisor.ModuleNotFound")
            ]
        ) >= 1.0
    );

    // Types as declared: counters, gauges.
    let typed = |metric: &str| samples(&sc, metric, &[])[0].value.clone();
    assert!(matches!(
        typed("ember_replica_restarts_total"),
        Value::Counter(_)
    ));
    assert!(matches!(typed("ember_pool_hits_total"), Value::Counter(_)));
    assert!(matches!(
        typed("ember_replica_memory_uss_bytes"),
        Value::Gauge(_)
    ));
    assert!(matches!(typed("ember_replica_state"), Value::Gauge(_)));

    // Module and replicas.
    assert_eq!(one(&sc, "ember_module_revision", &hello), 1.0);
    for r in ["0", "1"] {
        let l = [("module", "hello"), ("revision", "1"), ("replica", r)];
        let running = [("module", "hello"), ("replica", r), ("state", "running")];
        assert_eq!(one(&sc, "ember_replica_state", &running), 1.0);
        // One series per state, exactly one of them 1.
        assert_eq!(samples(&sc, "ember_replica_state", &l).len(), 9);
        assert_eq!(sum(&sc, "ember_replica_state", &l), 1.0);
        let (rss, pss, uss) = (
            one(&sc, "ember_replica_memory_rss_bytes", &l),
            one(&sc, "ember_replica_memory_pss_bytes", &l),
            one(&sc, "ember_replica_memory_uss_bytes", &l),
        );
        assert!(
            uss > 0.0 && uss < rss && pss <= rss && pss >= uss,
            "{rss} {pss} {uss}"
        );
        assert!(one(&sc, "ember_replica_cpu_seconds_total", &l) >= 0.0);
        let launches = one(&sc, "ember_replica_launches_total", &l);
        let restarts = one(&sc, "ember_replica_restarts_total", &l);
        assert_eq!(launches, restarts + 1.0, "replica {r}");
    }
    let r0 = [("module", "hello"), ("replica", "0")];
    assert!(one(&sc, "ember_replica_restarts_total", &r0) >= 1.0);
    let launches = sum(&sc, "ember_replica_launches_total", &hello);
    assert!(launches >= 3.0);

    // Start-up latency: every launch became ready; buckets cumulative,
    // `+Inf` the count; the sum positive and below count × the deadline.
    let h = samples(&sc, "ember_module_startup_seconds", &hello);
    assert_eq!(h.len(), 1, "{h:?}");
    let Value::Histogram(buckets) = &h[0].value else {
        panic!("not a histogram: {:?}", h[0]);
    };
    let count = one(&sc, "ember_module_startup_seconds_count", &hello);
    assert_eq!(count, launches);
    assert!(buckets
        .windows(2)
        .all(|w| w[0].count <= w[1].count && w[0].less_than < w[1].less_than));
    let inf = buckets.last().unwrap();
    assert!(
        inf.less_than.is_infinite() && inf.count == count,
        "{buckets:?}"
    );
    let total = one(&sc, "ember_module_startup_seconds_sum", &hello);
    assert!(total > 0.0 && total < count * 5.0, "{total}");

    // Pool: every launch took a worker, a hit or a miss; each fork timed.
    let (hits, misses) = (
        one(&sc, "ember_pool_hits_total", &[]),
        one(&sc, "ember_pool_misses_total", &[]),
    );
    assert!(hits + misses >= launches, "{hits} + {misses} < {launches}");
    // A fork fills the pool (a refill) or serves a launch that missed.
    let forks = one(&sc, "ember_pool_forks_total", &[]);
    let refills = one(&sc, "ember_pool_refills_total", &[]);
    assert!(
        refills <= forks && forks <= refills + misses,
        "{forks} {refills} {misses}"
    );
    assert!(forks >= 1.0);
    assert_eq!(
        one(&sc, "ember_pool_fork_seconds_count", &[]),
        forks,
        "one latency per fork"
    );
    assert!(one(&sc, "ember_pool_idle_workers", &[]) >= 0.0);
    assert_eq!(one(&sc, "ember_pool_fork_failures_total", &[]), 0.0);
    assert_eq!(one(&sc, "ember_zygote_restarts_total", &[]), 0.0);

    // A new revision: its replicas under revision 2, the module's
    // revision moved, the old run's series gone with it.
    let manifest = m.join("module.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("1.0.0", "2.0.0")).unwrap();
    d.ctl_ok(&["deploy", m.to_str().unwrap(), "--wait"]);
    let sc2 = poll_until("revision 1 gone", Duration::from_millis(50), || {
        let sc = scrape(addr);
        match samples(&sc, "ember_replica_launches_total", &[("revision", "1")]).len() {
            0 => Ok(sc),
            n => Err(format!("{n} replicas of revision 1 left")),
        }
    });
    assert_eq!(one(&sc2, "ember_module_revision", &hello), 2.0);
    for r in ["0", "1"] {
        let running = [("revision", "2"), ("replica", r), ("state", "running")];
        assert_eq!(one(&sc2, "ember_replica_state", &running), 1.0);
    }
    assert!(
        one(&sc2, "ember_uptime_seconds", &[]) > one(&sc, "ember_uptime_seconds", &[]),
        "uptime grows"
    );

    // Other paths and methods.
    let (code, _, _) = http(addr, "GET / HTTP/1.1\r\n\r\n");
    assert_eq!(code, 404);
    let (code, headers, _) = http(addr, "POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(code, 405);
    assert_eq!(headers["allow"], "GET");
    let (code, _, _) = http(addr, "hello\r\n\r\n");
    assert_eq!(code, 400);
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let (code, _, _) = http(addr, &huge);
    assert_eq!(code, 431);
}

#[test]
fn a_silent_client_holds_up_neither_scrapes_nor_the_control_socket() {
    let (d, addr) = start_with_metrics(FAST);
    // Connected, sending nothing (and another stuck in the middle of its
    // request head).
    let _silent = TcpStream::connect(addr).unwrap();
    let mut partial = TcpStream::connect(addr).unwrap();
    partial.write_all(b"GET /metr").unwrap();
    let sc = scrape(addr);
    assert!(one(&sc, "ember_uptime_seconds", &[]) > 0.0);
    let list = d.ctl_json(&["list"]);
    assert_eq!(list["modules"], serde_json::json!([]));
    // The silent one is answered 408 and closed after the read deadline
    // (the read timeout only guards against a hang).
    let mut silent = TcpStream::connect(addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reply = String::new();
    silent.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 408 "), "{reply}");
    // emberd's control socket still answers.
    d.ctl_ok(&["list"]);
}

#[test]
fn silent_connections_beyond_the_limit_do_not_lock_a_scraper_out() {
    let (d, addr) = start_with_metrics(FAST);
    // More silent connections than emberd serves at once (64), kept open,
    // then more opened while those are held: each new one closes the one
    // waiting longest for its head.
    let mut silent: Vec<TcpStream> = (0..80).map(|_| TcpStream::connect(addr).unwrap()).collect();
    // A real scrape is still answered (the reader's 30 s timeout only
    // guards against a hang).
    let sc = scrape(addr);
    assert!(one(&sc, "ember_uptime_seconds", &[]) > 0.0);
    // And again while the attacker reconnects.
    silent.extend((0..70).map(|_| TcpStream::connect(addr).unwrap()));
    let sc = scrape(addr);
    assert!(one(&sc, "ember_uptime_seconds", &[]) > 0.0);
    // The oldest silent ones were closed without a reply.
    let mut first = silent.remove(0);
    first
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reply = Vec::new();
    assert_eq!(
        first
            .read_to_end(&mut reply)
            .map(|_| reply.len())
            .unwrap_or(0),
        0
    );
    d.ctl_ok(&["list"]);
}

#[test]
fn counters_never_go_back_across_restarts() {
    let (d, addr) = start_with_metrics(FAST);
    // A worker that uses CPU (it touches 8 MiB chunks) until its memory
    // limit kills it, again and again.
    let m = real_module(
        d.dir.path(),
        "alloc",
        "fixture-unbounded-alloc",
        "[limits]\nmemory = \"64MiB\"\nstart_deadline = \"2s\"\nstop_deadline = \"1s\"\n",
    );
    d.ctl_ok(&["install", m.to_str().unwrap()]);
    let l = [("module", "alloc"), ("revision", "1"), ("replica", "0")];
    let alloc = [("module", "alloc")];
    let mut last = (0.0, 0.0, 0.0);
    let mut scrapes = 0;
    poll_until("four launches of alloc", Duration::from_millis(20), || {
        let sc = scrape(addr);
        scrapes += 1;
        let now = (
            one(&sc, "ember_replica_cpu_seconds_total", &l),
            one(&sc, "ember_replica_launches_total", &l),
            one(&sc, "ember_module_startup_seconds_count", &alloc),
        );
        assert!(
            now.0 >= last.0 && now.1 >= last.1 && now.2 >= last.2,
            "a counter went back (cpu, launches, startups): {last:?} then {now:?}"
        );
        last = now;
        if now.1 >= 4.0 {
            Ok(())
        } else {
            Err(format!("{now:?}"))
        }
    });
    // The exited workers' CPU time is in the total: three of them each
    // faulted in 64 MiB.
    assert!(last.0 > 0.0, "{last:?} after {scrapes} scrapes");
}

#[test]
fn a_rollback_continues_the_revisions_counters() {
    let (d, addr) = start_with_metrics(FAST);
    let m = real_module(d.dir.path(), "hello", "hello", "");
    d.ctl_ok(&["install", m.to_str().unwrap(), "--wait"]);
    let r1 = [("module", "hello"), ("revision", "1"), ("replica", "0")];
    let hello1 = [("module", "hello"), ("revision", "1")];
    let sc = scrape(addr);
    assert_eq!(one(&sc, "ember_replica_launches_total", &r1), 1.0);
    assert_eq!(one(&sc, "ember_module_startup_seconds_count", &hello1), 1.0);
    let manifest = m.join("module.toml");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(&manifest, text.replace("1.0.0", "2.0.0")).unwrap();
    d.ctl_ok(&["deploy", m.to_str().unwrap(), "--wait"]);
    // Back to revision 1: a new run of it, whose counts add to the first
    // run's (one launch each).
    d.ctl_ok(&["rollback", "hello", "--to", "1", "--wait"]);
    let sc = poll_until("revision 2 gone", Duration::from_millis(50), || {
        let sc = scrape(addr);
        match samples(&sc, "ember_replica_launches_total", &[("revision", "2")]).len() {
            0 => Ok(sc),
            n => Err(format!("{n} replicas of revision 2 left")),
        }
    });
    assert_eq!(
        one(&sc, "ember_module_revision", &[("module", "hello")]),
        1.0
    );
    assert_eq!(one(&sc, "ember_replica_launches_total", &r1), 2.0);
    assert_eq!(one(&sc, "ember_module_startup_seconds_count", &hello1), 2.0);
}

/// `emberctl list --watch` draws from `List` calls, each one counted by
/// emberd (`ember_control_calls_total`): fed by events, it makes none while
/// nothing happens, and one burst of them when something does. A watch that
/// polled would call `List` during the quiet period.
#[test]
fn list_watch_calls_list_only_after_events() {
    // No warm pool: nothing happens in emberd until the install.
    let (d, addr) = start_with_metrics(&format!("{FAST}[pool]\nmin_idle = 0\nmax_idle = 0\n"));
    let mut watch = ember_tests::ChildGuard(
        Command::new(emberctl())
            .arg("--socket")
            .arg(&d.socket)
            .args(["list", "--watch"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stdout = watch.0.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    // (Receive timeouts below only guard against a hang.)
    let first = rx.recv_timeout(ember_tests::PATIENCE).unwrap();
    assert!(first.starts_with("NAME"), "{first}");
    let list = [("method", "io.ember.Supervisor.List")];
    let lists = |sc: &Scrape| sum(sc, "ember_control_calls_total", &list);
    let before = lists(&scrape(addr));
    assert!(before >= 1.0, "the first drawing called List");
    // A quiet period: no List call, no redraw.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        lists(&scrape(addr)),
        before,
        "List called with nothing happening"
    );
    assert!(rx.try_recv().is_err(), "redrawn with nothing happening");
    // Something happens: it is drawn.
    let m = module_dir(d.dir.path(), "hello", "1.0.0");
    d.ctl_ok(&["install", m.to_str().unwrap()]);
    loop {
        let line = rx.recv_timeout(ember_tests::PATIENCE).unwrap();
        if line.starts_with("hello ") && line.contains(" running ") {
            break;
        }
    }
    assert!(lists(&scrape(addr)) > before);
    watch.kill();
}

/// Socket inodes emberd has open that listen on TCP.
fn listening_tcp_inodes(pid: i32) -> Vec<u64> {
    let mut listening = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // st 0A = LISTEN; field 9 is the inode.
            if f.get(3) == Some(&"0A") {
                listening.extend(f.get(9).and_then(|i| i.parse::<u64>().ok()));
            }
        }
    }
    let mut own = Vec::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
    {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue;
        };
        let t = target.to_string_lossy();
        if let Some(inode) = t
            .strip_prefix("socket:[")
            .and_then(|r| r.strip_suffix(']'))
            .and_then(|i| i.parse::<u64>().ok())
        {
            if listening.contains(&inode) {
                own.push(inode);
            }
        }
    }
    own
}

#[test]
fn metrics_are_off_by_default() {
    let d = Daemon::start(FAST);
    d.ctl_ok(&["list"]);
    assert_eq!(listening_tcp_inodes(d.pid()), Vec::<u64>::new());
    // The same check sees the listener when there is one.
    let (m, _) = start_with_metrics(FAST);
    assert_eq!(listening_tcp_inodes(m.pid()).len(), 1);
}

fn emberd_fails(args: &[&str], dir: &TempDir) -> (Option<i32>, String) {
    let out = Command::new(emberd())
        .args(args)
        .arg("--socket")
        .arg(dir.path().join("ctl.sock"))
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("EMBER_LOG", "error")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_or_busy_metrics_address_stops_emberd_with_a_clear_error() {
    let dir = TempDir::new("bad");
    let (code, err) = emberd_fails(&["--metrics", "localhost:9464"], &dir);
    assert_eq!(code, Some(78), "{err}");
    assert!(
        err.contains("field `--metrics`: \"localhost:9464\" is not an IP address and port"),
        "{err}"
    );
    let cfg = dir.path().join("emberd.toml");
    std::fs::write(&cfg, "metrics_address = \"127.0.0.1\"\n").unwrap();
    let (code, err) = emberd_fails(&["--config", cfg.to_str().unwrap()], &dir);
    assert_eq!(code, Some(78), "{err}");
    assert!(err.contains(":1:1: field `metrics_address`"), "{err}");

    // In use: emberd stops before starting any process, socket removed.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (code, err) = emberd_fails(&["--metrics", &addr], &dir);
    assert_eq!(code, Some(69), "{err}");
    assert!(
        err.contains(&format!(
            "metrics listener: cannot bind {addr}: Address already in use"
        )),
        "{err}"
    );
    assert!(!dir.path().join("ctl.sock").exists());
}
