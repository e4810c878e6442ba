//! Real processes: the test zygote loads plugins and forks workers; the
//! tests act as the supervisor over the workers' control sockets and load
//! the real example and fixture cdylibs.

mod common;

use std::os::fd::OwnedFd;
use std::time::Duration;

use common::*;
use module_runtime::abi::GrantKind;
use module_runtime::protocol::{FailureKind, FromWorker, Grant, Stage, State, ToWorker};
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
    assert!(fds <= 10, "worker holds {fds} descriptors");

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
    let mut z = Zygote::start(&[]);
    let mut w = z.fork();
    let dir = format!("fixtures/{}", name.trim_start_matches("fixture-"));
    w.launch(&artifact(name), &manifest(&dir), 0, vec![]);
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

#[test]
fn fixture_unbounded_alloc_hits_the_memory_limit() {
    fixture(
        "fixture-unbounded-alloc",
        Stage::Serve,
        FailureKind::MemoryLimitExceeded,
        "limit is 64 MiB",
        "17",
    );
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
    const SIZE_MB: u64 = 128;
    const INIT_MS: u64 = 200;
    let config = format!("size_mb = {SIZE_MB}\nextra_init_ms = {INIT_MS}\n");
    let mut z = Zygote::start(&[(artifact("catalog"), &config)]);
    let (l, _) = listener();
    let addr = l.local_addr().unwrap();
    let mut workers = Vec::new();
    for replica in 0..2 {
        let mut w = z.fork();
        let fd = OwnedFd::from(l.try_clone().unwrap());
        w.launch(
            &artifact("greeter"),
            &manifest("greeter"),
            replica,
            vec![(GrantKind::Listener, "http", vec![fd])],
        );
        w.wait_state(State::Ready, T);
        workers.push(w);
    }
    // Both replicas answer on the shared listener and read the catalog,
    // which was initialized once, in the zygote, before the fork.
    let expected = format!(
        "catalog_entries={} catalog_init_pid={} pid=",
        (SIZE_MB << 20) / 64,
        z.pid()
    );
    let mut seen = std::collections::HashSet::new();
    for _ in 0..40 {
        let (code, body) = http_get(addr, "/stats");
        assert_eq!(code, 200);
        assert!(body.starts_with(&expected), "{body}");
        seen.insert(body);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(
        seen.len(),
        2,
        "both replicas accept on the shared listener: {seen:?}"
    );
    // Entries read through the plugin's table, in place.
    let (code, body) = http_get(addr, "/catalog/12345");
    assert_eq!(code, 200);
    assert!(body.starts_with("12345 item-0000012345 "), "{body}");
    let table_kib = SIZE_MB << 10;
    for w in &workers {
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
        let (rss, pss, private) = smaps_rollup(w.pid);
        eprintln!(
            "worker {}: rss {rss} KiB, pss {pss} KiB, uss {private} KiB",
            w.pid
        );
        // No worker holds a private copy of any part of it.
        assert!(
            private < table_kib / 4,
            "uss {private} KiB: catalog pages were copied"
        );
    }
    for w in &mut workers {
        w.stop(Duration::from_secs(2));
    }
    for w in &mut workers {
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
