//! Real processes: the test zygote loads plugins and forks workers; the
//! tests act as the supervisor over the workers' control sockets and load
//! the real example and fixture cdylibs.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::*;
use module_runtime::abi::GrantKind;
use module_runtime::protocol::{Failure, FailureKind, FromWorker, Grant, Stage, State, ToWorker};
use std::os::fd::AsFd;

const T: Duration = Duration::from_secs(20);

fn listener() -> (std::net::TcpListener, OwnedFd) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let fd = OwnedFd::from(l.try_clone().unwrap());
    (l, fd)
}

#[test]
fn hello_runs_its_lifecycle() {
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    w.launch(&artifact("hello"), &manifest("hello"), 0, vec![]);
    w.wait_state(State::Ready, T);

    // Process name and descriptors were reset.
    let comm = std::fs::read_to_string(format!("/proc/{}/comm", w.pid)).unwrap();
    assert_eq!(comm.trim_end(), "ember: hello@0.");
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", w.pid)).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).starts_with("ember: hello@0.1.0#0"),
        "{cmdline:?}"
    );
    let fds = std::fs::read_dir(format!("/proc/{}/fd", w.pid))
        .unwrap()
        .count();
    // stdio, the control socket and its copy, the shutdown and attach
    // pipes, the signalfd and the start-deadline timerfd: 11.
    assert!(fds <= 11, "worker holds {fds} descriptors");

    w.wait_for(
        T,
        |m| matches!(m, FromWorker::Log { message, .. } if message == "hello, world"),
    );
    w.stop(Duration::from_secs(2));
    w.wait_state(State::Stopped, T);
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 0", w.pid));
    let logs = w.logs();
    assert!(logs.iter().any(|l| l.contains("goodbye")), "{logs:?}");
    assert!(
        logs.iter()
            .any(|l| l.contains("starting module=hello@0.1.0#0")),
        "{logs:?}"
    );
    let states: Vec<State> = w
        .events
        .iter()
        .filter_map(|e| match e {
            FromWorker::Transition { state, .. } => Some(*state),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            State::Loading,
            State::Loaded,
            State::Starting,
            State::Serving,
            State::Ready,
            State::Stopping,
            State::Stopped
        ]
    );
}

fn fixture(name: &str, stage: Stage, kind: FailureKind, needle: &str, exit: &str) {
    fixture_with(name, "", stage, kind, needle, exit);
}

/// Launches fixture `name` with `extra` appended to its manifest, expects
/// the failure `(stage, kind)` with `needle` in its message and the worker's
/// end `exit` (code or signal name), and checks that the zygote carries on.
fn fixture_with(
    name: &str,
    extra: &str,
    stage: Stage,
    kind: FailureKind,
    needle: &str,
    exit: &str,
) -> Failure {
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    let dir = format!("fixtures/{}", name.trim_start_matches("fixture-"));
    w.launch(
        &artifact(name),
        &format!("{}{extra}", manifest(&dir)),
        0,
        vec![],
    );
    let f = w.wait_failure(T);
    assert_eq!((f.stage, f.kind), (stage, kind), "{f}");
    assert!(
        f.message.contains(needle),
        "message {:?} lacks {needle:?}",
        f.message
    );
    let end = z.wait_exit(w.pid, T);
    assert_eq!(
        end,
        format!(
            "{} {} {exit}",
            if exit.starts_with("SIG") {
                "signal"
            } else {
                "exit"
            },
            w.pid
        )
    );
    // The parent keeps running and keeps forking.
    zygote_carries_on(&mut z);
    f
}

/// The zygote is alive and still forks workers that behave.
fn zygote_carries_on(z: &mut Zygote) {
    assert!(z.is_alive());
    let mut again = z.fork();
    again.stop(Duration::from_secs(1));
    assert_eq!(z.wait_exit(again.pid, T), format!("exit {} 0", again.pid));
}

#[test]
fn fixture_panic_in_start_is_reported_with_its_message() {
    fixture(
        "fixture-panic-start",
        Stage::Start,
        FailureKind::Panic,
        "fixture panic in start: config missing",
        "12",
    );
}

#[test]
fn fixture_segfault_is_reported() {
    fixture(
        "fixture-segfault",
        Stage::Serve,
        FailureKind::Crashed,
        "SIGSEGV",
        "SIGSEGV",
    );
}

#[test]
fn fixture_abort_is_reported() {
    fixture(
        "fixture-abort",
        Stage::Serve,
        FailureKind::Crashed,
        "SIGABRT",
        "SIGABRT",
    );
}

#[test]
fn fixture_never_ready_hits_the_start_deadline() {
    fixture(
        "fixture-never-ready",
        Stage::Start,
        FailureKind::NeverReady,
        "not ready within 500ms",
        "15",
    );
}

/// Context switches of the thread of `pid` named `name`, once it sleeps (a
/// thread still starting has its creator's name, and one about to block
/// would add a switch).
fn sleeping_thread_switches(pid: i32, name: &str) -> u64 {
    let what = format!("thread {name} of {pid} asleep");
    ember_tests::poll_until(&what, Duration::from_millis(5), || {
        for t in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
            let t = t.unwrap().path();
            if std::fs::read_to_string(t.join("comm")).unwrap().trim() != name {
                continue;
            }
            let status = std::fs::read_to_string(t.join("status")).unwrap();
            if !status.contains("State:\tS") {
                return Err(status);
            }
            return Ok(status
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .map(|l| l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap())
                .sum());
        }
        Err(format!("no thread {name} yet"))
    })
}

#[test]
fn a_ready_module_is_not_woken_at_its_start_deadline() {
    // The control thread counts the start deadline down while the module
    // starts; once it is ready, that deadline must not wake the worker
    // (an idle module costs no wake-ups).
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    let text = manifest("hello").replace("start_deadline = \"2s\"", "start_deadline = \"300ms\"");
    assert!(text.contains("300ms"), "{text}");
    w.launch(&artifact("hello"), &text, 0, vec![]);
    w.wait_state(State::Ready, T);
    w.wait_for(
        T,
        |m| matches!(m, FromWorker::Log { message, .. } if message == "hello, world"),
    );
    let before = sleeping_thread_switches(w.pid, "ember-control");
    // Well past the deadline (not a speed bound: waiting longer only
    // makes the check stricter).
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(sleeping_thread_switches(w.pid, "ember-control"), before);
    w.stop(Duration::from_secs(2));
    w.wait_state(State::Stopped, T);
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 0", w.pid));
}

#[test]
fn without_a_cgroup_the_worker_caps_its_address_space_and_runs_no_memory_thread() {
    // `limits.memory` is the host's to enforce: a cgroup, or emberd's
    // memory watch sampling the worker's private memory from outside
    // (supervisor/src/memwatch.rs, tested with the real emberd in
    // tests/tests/limits.rs). The worker only caps its address space as a
    // backstop, and runs no thread of its own that would wake it.
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    let text = manifest("hello");
    assert!(text.contains("memory = "), "{text}");
    w.launch(&artifact("hello"), &text, 0, vec![]);
    w.wait_state(State::Ready, T);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", w.pid)).unwrap();
    let cap = limits
        .lines()
        .find(|l| l.starts_with("Max address space"))
        .unwrap();
    assert!(!cap.contains("unlimited"), "{cap}");
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", w.pid))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap())
        .map(|c| c.trim().to_owned())
        .filter(|c| c.starts_with("ember-"))
        .collect();
    assert_eq!(threads, ["ember-control"]);
    w.stop(Duration::from_secs(2));
    w.wait_state(State::Stopped, T);
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 0", w.pid));
}

#[test]
fn fixture_wrong_abi_is_refused_before_any_call() {
    fixture(
        "fixture-wrong-abi",
        Stage::Load,
        FailureKind::AbiMismatch,
        "ABI version 999",
        "11",
    );
}

#[test]
fn load_errors_are_typed() {
    let dir = TempDir::new();
    let text = dir.0.join("libtext.so");
    std::fs::write(&text, "not an ELF file").unwrap();
    let cases = [
        (text, FailureKind::BadArtifact, "is not an ELF file"),
        (
            dir.0.join("libmissing.so"),
            FailureKind::BadArtifact,
            "cannot read",
        ),
        // A plugin is a shared object without the module symbol.
        (
            artifact("catalog"),
            FailureKind::MissingSymbol,
            "does not export `ember_module_descriptor`",
        ),
    ];
    let mut z = Zygote::start(&[]);
    for (path, kind, needle) in cases {
        let mut w = z.fork();
        w.launch(&path, &manifest("hello"), 0, vec![]);
        let f = w.wait_failure(T);
        assert_eq!((f.stage, f.kind), (Stage::Load, kind), "{f}");
        assert!(f.message.contains(needle), "{f}");
        assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 11", w.pid));
    }
    // A bad manifest and a descriptor count mismatch are launch errors.
    let mut w = z.fork();
    w.launch(
        &artifact("hello"),
        "name = \"hello\"\nversion = \"0.1.0\"\nentry = \"x.so\"\nreplicaz = 2\n",
        0,
        vec![],
    );
    let f = w.wait_failure(T);
    assert_eq!(
        (f.stage, f.kind),
        (Stage::Launch, FailureKind::BadLaunchOrder)
    );
    assert!(
        f.message.contains("replicaz") && f.message.contains("line 4"),
        "{f}"
    );
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 10", w.pid));
}

#[test]
fn greeter_calls_kv_over_shm_ipc() {
    let mut z = Zygote::start(&[(artifact("catalog"), "size_mb = 4\nextra_init_ms = 0\n")]);
    let mut kv = z.fork();
    let mut greeter = z.fork();
    let (client, server) =
        shm_ipc::channel::channel_pair(&shm_ipc::channel::ChannelConfig::default()).unwrap();
    let (sm, ss) = server.into_fds();
    kv.launch(
        &artifact("kv"),
        &manifest("kv"),
        0,
        vec![(GrantKind::Export, "kv", vec![sm, ss])],
    );
    kv.wait_state(State::Ready, T);
    let (l, lfd) = listener();
    let (cm, cs) = client.into_fds();
    greeter.launch(
        &artifact("greeter"),
        &manifest("greeter"),
        0,
        vec![
            (GrantKind::Listener, "http", vec![lfd]),
            (GrantKind::Import, "kv", vec![cm, cs]),
        ],
    );
    greeter.wait_state(State::Ready, T);
    let addr = l.local_addr().unwrap();
    assert_eq!(
        http_get(addr, "/kv/get/colour"),
        (404, "no such key".into())
    );
    assert_eq!(http_get(addr, "/kv/put/colour/teal"), (200, "ok".into()));
    assert_eq!(http_get(addr, "/kv/get/colour"), (200, "teal".into()));
    let (code, body) = http_get(addr, "/hello/ada");
    assert_eq!(code, 200);
    assert!(body.contains("greeter@0.1.0#0"), "{body}");
    let (code, body) = http_get(addr, "/catalog/42");
    assert_eq!(code, 200);
    assert!(body.starts_with("42 item-0000000042 "), "{body}");

    // A second importer started later: its server end is attached to the
    // running kv instance.
    let mut greeter2 = z.fork();
    let (client2, server2) =
        shm_ipc::channel::channel_pair(&shm_ipc::channel::ChannelConfig::default()).unwrap();
    let (sm2, ss2) = server2.into_fds();
    kv.chan
        .send(
            &ToWorker::Attach(vec![Grant {
                kind: GrantKind::Export,
                name: "kv".into(),
            }]),
            &[sm2.as_fd(), ss2.as_fd()],
        )
        .unwrap();
    drop((sm2, ss2));
    let (l2, lfd2) = listener();
    let (cm2, cs2) = client2.into_fds();
    greeter2.launch(
        &artifact("greeter"),
        &manifest("greeter"),
        1,
        vec![
            (GrantKind::Listener, "http", vec![lfd2]),
            (GrantKind::Import, "kv", vec![cm2, cs2]),
        ],
    );
    greeter2.wait_state(State::Ready, T);
    let addr2 = l2.local_addr().unwrap();
    assert_eq!(http_get(addr2, "/kv/get/colour"), (200, "teal".into()));
    assert_eq!(http_get(addr2, "/kv/put/shape/round"), (200, "ok".into()));
    assert_eq!(http_get(addr, "/kv/get/shape"), (200, "round".into()));
    greeter2.stop(Duration::from_secs(2));
    greeter2.wait_state(State::Stopped, T);
    assert_eq!(
        z.wait_exit(greeter2.pid, T),
        format!("exit {} 0", greeter2.pid)
    );

    greeter.stop(Duration::from_secs(2));
    greeter.wait_state(State::Stopped, T);
    assert_eq!(
        z.wait_exit(greeter.pid, T),
        format!("exit {} 0", greeter.pid)
    );
    kv.stop(Duration::from_secs(2));
    kv.wait_state(State::Stopped, T);
    assert_eq!(z.wait_exit(kv.pid, T), format!("exit {} 0", kv.pid));
    assert!(
        kv.logs().iter().any(|l| l.contains("kv stopped keys=2")),
        "{:?}",
        kv.logs()
    );
}

#[test]
fn plugin_memory_is_shared_between_workers() {
    const SIZE_MB: u64 = 96;
    const WORKERS: u32 = 3;
    let config = format!("size_mb = {SIZE_MB}\nextra_init_ms = 0\n");
    let mut z = Zygote::start(&[(artifact("catalog"), &config)]);
    let entries = (SIZE_MB << 20) / 64;
    let table_kib = SIZE_MB << 10;
    // What the whole table sums to (the catalog's price of entry i).
    let expected_sum: u64 = (0..entries)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 100_000)
        .sum();
    let mut workers = Vec::new();
    for replica in 0..WORKERS {
        let mut w = z.fork();
        // One listener each, so that every request reaches a known worker.
        let (l, fd) = listener();
        w.launch(
            &artifact("greeter"),
            &manifest("greeter"),
            replica,
            vec![(GrantKind::Listener, "http", vec![fd])],
        );
        w.wait_state(State::Ready, T);
        workers.push((w, l.local_addr().unwrap(), l));
    }
    for (w, addr, _) in &workers {
        // The catalog was initialized once, in the zygote, before the fork.
        let (code, body) = http_get(*addr, "/stats");
        assert_eq!(code, 200);
        assert_eq!(
            body,
            format!(
                "catalog_entries={entries} catalog_init_pid={} pid={}",
                z.pid(),
                w.pid
            )
        );
        // Each worker reads every entry of the table, in place.
        let (code, body) = http_get(*addr, "/catalog/sum");
        assert_eq!(
            (code, body),
            (
                200,
                format!("price_sum={expected_sum} entries={entries} pid={}", w.pid)
            )
        );
        let (code, body) = http_get(*addr, "/catalog/12345");
        assert_eq!(code, 200);
        assert!(body.starts_with("12345 item-0000012345 "), "{body}");
    }
    // The zygote built the table through a writable mapping it then
    // dropped; its read-only mapping is only inherited, never read there.
    let (zygote_rss, _) = smaps_mapping(z.pid(), "/memfd:ember-plugin-table");
    for (w, _, _) in &workers {
        // The table is one sealed memfd, mapped read-only and shared
        // (`r--s`) in every worker, inherited from the zygote.
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", w.pid)).unwrap();
        let table: Vec<&str> = maps
            .lines()
            .filter(|l| l.contains("/memfd:ember-plugin-table"))
            .collect();
        assert_eq!(table.len(), 1, "{maps}");
        assert!(
            table[0].split_whitespace().nth(1) == Some("r--s"),
            "{}",
            table[0]
        );
        let (map_rss, map_pss) = smaps_mapping(w.pid as u32, "/memfd:ember-plugin-table");
        let (rss, pss, uss) = smaps_rollup(w.pid);
        let report = format!(
            "worker {}: rss {rss} KiB, pss {pss} KiB, uss {uss} KiB; table {table_kib} KiB: \
             rss {map_rss} KiB, pss {map_pss} KiB in this worker, rss {zygote_rss} KiB in the zygote",
            w.pid
        );
        eprintln!("{report}");
        // The whole table is resident in this worker (but for a few pages
        // the host may have reclaimed since it was read: kernels running
        // DAMON reclaim, as CI's does, page out cold pages)...
        let nearly = table_kib - table_kib / 100;
        assert!(map_rss >= nearly && rss >= nearly, "{report}");
        // ...in the same physical pages as in the other workers: each
        // worker's proportional share of the table is a third (no copy,
        // no page of it counted for one worker alone)...
        assert!(
            map_pss * u64::from(WORKERS) <= table_kib + table_kib / 100,
            "{report}"
        );
        assert!(pss * 10 <= table_kib * 6, "{report}");
        // ...and no worker holds a private copy of any part of it.
        assert!(
            uss < table_kib / 4,
            "uss: catalog pages were copied; {report}"
        );
    }
    for (w, _, _) in &mut workers {
        w.stop(Duration::from_secs(2));
    }
    for (w, _, _) in &mut workers {
        w.wait_state(State::Stopped, T);
        assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 0", w.pid));
    }
}

#[test]
fn hello_reads_sealed_shared_data() {
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    let archive = module_runtime::rkyv::to_bytes::<module_runtime::rkyv::rancor::Error>(
        &String::from("be kind"),
    )
    .unwrap();
    let fd = shm_ipc::data::seal_bytes(&archive, 7).unwrap();
    w.launch(
        &artifact("hello"),
        &manifest("hello"),
        0,
        vec![(GrantKind::SharedData, "motd", vec![fd])],
    );
    w.wait_for(
        T,
        |m| matches!(m, FromWorker::Log { message, .. } if message == "motd: be kind generation=7"),
    );
    w.stop(Duration::from_secs(2));
    w.wait_state(State::Stopped, T);
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 0", w.pid));
}

#[test]
fn undeclared_grants_are_refused() {
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    let (_l, fd) = listener();
    w.launch(
        &artifact("hello"),
        &manifest("hello"),
        0,
        vec![(GrantKind::Listener, "admin", vec![fd])],
    );
    let f = w.wait_failure(T);
    assert_eq!(
        (f.stage, f.kind),
        (Stage::Launch, FailureKind::BadLaunchOrder)
    );
    assert!(f.message.contains("`admin` is not declared"), "{f}");
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 10", w.pid));
}

#[test]
fn sigterm_stops_gracefully() {
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    w.launch(&artifact("hello"), &manifest("hello"), 3, vec![]);
    w.wait_state(State::Ready, T);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(w.pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let m = w.wait_for(T, |m| {
        matches!(
            m,
            FromWorker::Transition {
                state: State::Stopping,
                ..
            }
        )
    });
    assert!(
        matches!(&m, FromWorker::Transition { detail, .. } if detail == "signal 15"),
        "{m:?}"
    );
    w.wait_state(State::Stopped, T);
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 0", w.pid));
}

#[test]
fn fixture_ignoring_stop_hits_the_stop_deadline() {
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    w.launch(
        &artifact("fixture-ignores-stop"),
        &manifest("fixtures/ignores-stop"),
        0,
        vec![],
    );
    w.wait_state(State::Ready, T);
    w.stop(Duration::from_millis(300));
    let f = w.wait_failure(T);
    assert_eq!(
        (f.stage, f.kind),
        (Stage::Stop, FailureKind::StopDeadlineExceeded),
        "{f}"
    );
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 16", w.pid));
    assert!(z.is_alive());
}

#[test]
fn plugin_table_panic_is_caught_and_logged() {
    // A broken catalog whose `lookup` indexes past its three entries.
    let mut z = Zygote::start(&[(artifact("fixture-panic-plugin"), "")]);
    let dir = TempDir::new();
    let log_path = dir.0.join("greeter.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut w = z.fork();
    let (l, fd) = listener();
    w.launch(
        &artifact("greeter"),
        &manifest("greeter"),
        0,
        vec![
            (GrantKind::Listener, "http", vec![fd]),
            // The instance's stdout and stderr, as the supervisor passes them.
            (GrantKind::Stdio, "stdio", vec![OwnedFd::from(log)]),
        ],
    );
    w.wait_state(State::Ready, T);
    let addr = l.local_addr().unwrap();
    assert_eq!(http_get(addr, "/catalog/1"), (200, "1 e1 200".into()));
    // The plugin panics inside the module's request: the guard catches it,
    // the module sees "not found", and the worker keeps serving.
    assert_eq!(http_get(addr, "/catalog/42"), (404, "no such item".into()));
    let (code, body) = http_get(addr, "/hello/ada");
    assert_eq!(code, 200, "{body}");
    assert_eq!(http_get(addr, "/catalog/2"), (200, "2 e2 300".into()));
    // The message, with the entry point and source location, is in the
    // instance's log (the plugin has no tracing subscriber after init).
    let text = std::fs::read_to_string(&log_path).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains("`catalog.lookup` panicked"))
        .unwrap_or_else(|| panic!("no panic report in the log: {text:?}"));
    assert!(
        line.starts_with("ember::panic: ")
            && line.contains("index out of bounds: the len is 3 but the index is 42")
            && line.contains("panic-plugin/src/lib.rs:")
            && line.ends_with("returned the fallback value"),
        "{line}"
    );
    assert_eq!(text.matches("panicked").count(), 1, "reported once: {text}");
    w.stop(Duration::from_secs(2));
    w.wait_state(State::Stopped, T);
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 0", w.pid));
}

#[test]
fn fixture_panic_in_serve_is_reported_with_its_message() {
    let f = fixture_with(
        "fixture-panic-start",
        "\n[config]\npanic_in = \"serve\"\n",
        Stage::Serve,
        FailureKind::Panic,
        "fixture panic in serve: request handler bug (at ",
        "13",
    );
    assert!(
        f.to_string()
            .starts_with("Serve failed (Panic): fixture panic in serve: request handler bug"),
        "{f}"
    );
    assert!(f.message.contains("panic-start/src/lib.rs:"), "{f}");
}

#[test]
fn fixture_panic_in_stop_is_reported_with_its_message() {
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    w.launch(
        &artifact("fixture-panic-start"),
        &format!(
            "{}\n[config]\npanic_in = \"stop\"\n",
            manifest("fixtures/panic-start")
        ),
        0,
        vec![],
    );
    w.wait_state(State::Ready, T);
    w.stop(Duration::from_secs(2));
    let f = w.wait_failure(T);
    assert_eq!((f.stage, f.kind), (Stage::Stop, FailureKind::Panic), "{f}");
    assert!(
        f.to_string()
            .starts_with("Stop failed (Panic): fixture panic in stop: flush failed (at ")
            && f.message.contains("panic-start/src/lib.rs:"),
        "{f}"
    );
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 14", w.pid));
    zygote_carries_on(&mut z);
}

#[test]
fn plugin_panic_in_init_is_refused_with_its_message() {
    let plugin = artifact("fixture-panic-plugin");
    let (msg, status) = Zygote::start_failing(&[(plugin.clone(), "panic_in_init = true\n")]);
    assert!(
        msg.starts_with(
            "error: plugin `catalog` failed to initialize: \
             fixture panic in plugin init: catalog file is corrupt (at "
        ) && msg.contains("panic-plugin/src/lib.rs:"),
        "{msg}"
    );
    // The panic was caught: the zygote refused the plugin and exited with
    // its error code; it did not abort.
    assert_eq!(status.code(), Some(1), "{status}");
    // The test (the zygote's parent) carries on, and the same plugin
    // without the fault initializes.
    let mut z = Zygote::start(&[(plugin, "panic_in_init = false\n")]);
    zygote_carries_on(&mut z);
}

#[test]
fn each_worker_seeds_std_hashmaps_afresh() {
    let mut z = Zygote::start(&[]);
    let manifest = format!("{}log_hash_probe = true\n", manifest("hello"));
    assert!(manifest.contains("[config]\ngreeting"), "{manifest}");
    let mut probes = Vec::new();
    for replica in 0..2 {
        let mut w = z.fork();
        w.launch(&artifact("hello"), &manifest, replica, vec![]);
        let m = w.wait_for(T, |m| {
            matches!(m, FromWorker::Log { message, .. }
                if message.starts_with("std RandomState probe: "))
        });
        let FromWorker::Log { message, .. } = m else {
            unreachable!()
        };
        probes.push(message);
        w.stop(Duration::from_secs(2));
        w.wait_state(State::Stopped, T);
        assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 0", w.pid));
    }
    // Same module, same code, same zygote: different keys.
    assert_ne!(probes[0], probes[1]);
}

#[test]
fn workers_do_not_inherit_the_zygotes_signal_state() {
    use nix::sys::signal::Signal::*;
    let mut z = Zygote::start(&[]);
    // The test zygote blocks SIGCHLD and SIGUSR1 and ignores SIGHUP.
    let (blk, ign, _) = signal_masks(std::path::Path::new(&format!("/proc/{}/status", z.pid())));
    assert!(
        blk.contains(&(SIGCHLD as i32)) && blk.contains(&(SIGUSR1 as i32)),
        "{blk:?}"
    );
    assert!(ign.contains(&(SIGHUP as i32)), "{ign:?}");
    eprintln!(
        "DEBUG zygote ign {ign:?} self {:?}",
        signal_masks(std::path::Path::new("/proc/self/status"))
    );

    // A warm worker: nothing blocked, nothing caught, and only SIGPIPE
    // ignored, as in any Rust program.
    let mut w = z.fork();
    let (blk, ign, cgt) = signal_masks(std::path::Path::new(&format!("/proc/{}/status", w.pid)));
    assert_eq!(
        (blk, ign, cgt),
        (vec![], vec![SIGPIPE as i32], vec![]),
        "warm worker"
    );

    // A running module sees, in every thread, what the runtime itself
    // installs and nothing else: SIGINT and SIGTERM blocked (read from a
    // signalfd by the control thread and turned into a graceful stop),
    // SIGPIPE ignored, and the reporting handler on the six fatal signals.
    w.launch(&artifact("hello"), &manifest("hello"), 0, vec![]);
    w.wait_state(State::Ready, T);
    let mut fatal = [SIGILL, SIGABRT, SIGBUS, SIGFPE, SIGSEGV, SIGSYS].map(|s| s as i32);
    fatal.sort_unstable();
    let mut stop = [SIGINT as i32, SIGTERM as i32];
    stop.sort_unstable();
    // main and ember-control. Wait until the helper threads have finished starting: a thread that
    // is still starting has every signal blocked by the C library and the
    // creator's name; it restores its mask before std names it.
    let tasks = ember_tests::poll_until("the worker's threads", Duration::from_millis(5), || {
        let tasks: Vec<_> = std::fs::read_dir(format!("/proc/{}/task", w.pid))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        let names: Vec<String> = tasks
            .iter()
            .map(|t| std::fs::read_to_string(t.join("comm")).unwrap_or_default())
            .collect();
        let helpers = names.iter().filter(|n| n.starts_with("ember-")).count();
        if tasks.len() >= 2 && helpers == tasks.len() - 1 {
            Ok(tasks)
        } else {
            Err(format!("{names:?}"))
        }
    });
    // Signals the C library reserves for itself (glibc: 32, 33, between
    // SIGSYS and SIGRTMIN): it installs its own handlers there once the
    // process has threads (SIGSETXID), which is its business.
    let libc_reserved = (SIGSYS as i32 + 1)..libc::SIGRTMIN();
    for task in tasks {
        let comm = std::fs::read_to_string(task.join("comm")).unwrap();
        let (blk, ign, mut cgt) = signal_masks(&task.join("status"));
        cgt.retain(|s| !libc_reserved.contains(s));
        assert_eq!(
            (blk, ign, cgt),
            (stop.to_vec(), vec![SIGPIPE as i32], fatal.to_vec()),
            "thread {}",
            comm.trim_end()
        );
    }
    w.stop(Duration::from_secs(2));
    w.wait_state(State::Stopped, T);
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 0", w.pid));
}

#[test]
fn fixture_wrong_sdk_is_refused_naming_both_versions() {
    let f = fixture_with(
        "fixture-wrong-sdk",
        "",
        Stage::Load,
        FailureKind::AbiMismatch,
        &format!(
            "built with module-runtime 999.0.0, this host runs module-runtime {}",
            module_runtime::abi::SDK_VERSION
        ),
        "11",
    );
    assert!(f.message.contains("libfixture_wrong_sdk.so"), "{f}");
}

#[test]
fn artifact_for_another_architecture_is_refused_before_dlopen() {
    let (foreign, name) = if cfg!(target_arch = "aarch64") {
        (62u16, "x86_64")
    } else {
        (183u16, "aarch64")
    };
    let dir = TempDir::new();
    let path = dir.0.join(format!("libhello-{name}.so"));
    let mut elf = std::fs::read(artifact("hello")).unwrap();
    // e_machine: two bytes at offset 18 (this host is little-endian).
    assert_eq!(&elf[..4], b"\x7fELF");
    elf[18..20].copy_from_slice(&foreign.to_le_bytes());
    std::fs::write(&path, elf).unwrap();
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    w.launch(&path, &manifest("hello"), 0, vec![]);
    let f = w.wait_failure(T);
    assert_eq!(
        (f.stage, f.kind),
        (Stage::Load, FailureKind::BadArtifact),
        "{f}"
    );
    let host = std::env::consts::ARCH;
    assert!(
        f.message.contains(&format!(
            "{} is built for {name}, host is {host}",
            path.display()
        )),
        "{f}"
    );
    // Refused on the ELF header: the dynamic loader never saw it.
    assert!(
        !w.events.iter().any(|e| matches!(
            e,
            FromWorker::Transition {
                state: State::Loaded,
                ..
            }
        )),
        "{:?}",
        w.events
    );
    assert_eq!(z.wait_exit(w.pid, T), format!("exit {} 11", w.pid));
    zygote_carries_on(&mut z);
}

#[test]
fn fixture_hanging_in_load_hits_the_start_deadline() {
    // `limits.start_deadline` counts from the launch order, loading
    // included: a library constructor that never returns is caught.
    fixture(
        "fixture-hangs-in-load",
        Stage::Load,
        FailureKind::NeverReady,
        "not ready within 300ms (limits.start_deadline)",
        "15",
    );
}

/// Reads one HTTP response from a kept-alive connection: status, the
/// `Connection` header, body.
fn read_response(s: &mut std::net::TcpStream) -> (u16, String, String) {
    use std::io::Read;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "connection closed mid-head");
        head.push(b[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                let (n, v) = l.split_once(':')?;
                n.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    };
    let mut body = vec![0u8; header("content-length").parse().unwrap()];
    s.read_exact(&mut body).unwrap();
    (
        status,
        header("connection"),
        String::from_utf8(body).unwrap(),
    )
}

#[test]
fn greeter_keeps_connections_alive_and_drains_on_stop() {
    use std::io::{Read, Write};
    let mut z = Zygote::start(&[]);
    let mut greeter = z.fork();
    let (l, lfd) = listener();
    greeter.launch(
        &artifact("greeter"),
        &manifest("greeter"),
        0,
        vec![(GrantKind::Listener, "http", vec![lfd])],
    );
    greeter.wait_state(State::Ready, T);
    let addr = l.local_addr().unwrap();
    let mut idle = std::net::TcpStream::connect(addr).unwrap();
    let mut busy = std::net::TcpStream::connect(addr).unwrap();
    for s in [&mut idle, &mut busy] {
        s.set_read_timeout(Some(T)).unwrap();
        // Two requests on one connection.
        s.write_all(b"GET /version HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        assert_eq!(
            read_response(s),
            (200, "keep-alive".into(), "0.1.0 greeter@0.1.0#0".into())
        );
        s.write_all(b"GET /hello/ada HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let (code, conn, body) = read_response(s);
        assert_eq!((code, conn.as_str()), (200, "keep-alive"));
        assert!(body.contains("ada"), "{body}");
    }
    // A request in flight when the stop arrives (kv is not there: it waits
    // for a kv end until its 2 s deadline) is answered, as the last one.
    busy.write_all(b"GET /kv/get/x HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    greeter.stop(Duration::from_secs(6));
    assert_eq!(
        read_response(&mut busy),
        (503, "close".into(), "kv not imported".into())
    );
    let mut rest = Vec::new();
    assert_eq!(busy.read_to_end(&mut rest).unwrap(), 0);
    // The idle connection is closed after the grace, without a response.
    assert_eq!(idle.read_to_end(&mut rest).unwrap(), 0);
    greeter.wait_state(State::Stopped, T);
    assert_eq!(
        z.wait_exit(greeter.pid, T),
        format!("exit {} 0", greeter.pid)
    );
    // The listening socket was not shut down: it still takes connections
    // for the other workers sharing it.
    std::net::TcpStream::connect(addr).unwrap();
    l.accept().unwrap();
}
