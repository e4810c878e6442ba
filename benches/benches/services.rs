//! Services benchmark: throughput of one importer calling an exporter with
//! 1 and with 2 replicas, through the SDK's client, in the same run.
//!
//! The importer is an `AsyncServiceClient` holding one channel per
//! exporter replica, called by `--concurrency` (4) tasks of a
//! current-thread tokio runtime (a module's default); each replica is a
//! real process (this binary re-executed with `--peer exporter SOCKET
//! REPLICA`) serving its channel with shm-ipc's `Server`, as
//! `ServiceServer` does: it validates and decodes the request, does
//! `--work-us` (20) of CPU work, and answers with its replica number. Rounds alternate 1 and 2 replicas; the figures are the
//! medians. The split of the calls between the two replicas is reported
//! too.
//!
//! `cargo bench --bench services -- --json` prints human-readable lines,
//! then one JSON object as the last line.

use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_benches::{arg_num, json_requested, reap, JsonLine};
use module_runtime::sdk::ChannelFds;
use module_runtime::service::{AsyncServiceClient, ServiceServer};
use shm_ipc::channel::{channel_pair, ChannelConfig};

/// CPU work per request in the exporter, µs (`--work-us`).
const WORK_US: u64 = 20;
/// Calls in flight at once: tasks sharing the client (`--concurrency`).
const CONCURRENCY: u64 = 4;
/// Calls per round, after `WARMUP`.
const CALLS: u64 = 20_000;
const WARMUP: u64 = 2_000;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let work = Duration::from_micros(arg_num("--work-us", WORK_US));
    if let Some(i) = args.iter().position(|a| a == "--peer") {
        let replica = args[i + 3].parse().expect("replica");
        exporter(Path::new(&args[i + 2]), replica, work);
        return;
    }
    let json = json_requested();
    let rounds = arg_num("--rounds", 5) as usize;
    let concurrency = arg_num("--concurrency", CONCURRENCY) as usize;
    let dir = std::env::temp_dir().join(format!("ember-bench-services-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let cfg = Config {
        rounds,
        concurrency,
        work,
    };
    let result = std::panic::catch_unwind(|| run(&dir, &cfg));
    let _ = std::fs::remove_dir_all(&dir);
    let line = match result {
        Ok(line) => line,
        Err(p) => std::panic::resume_unwind(p),
    };
    if json {
        println!("{line}");
    }
}

/// What to run.
struct Config {
    rounds: usize,
    concurrency: usize,
    work: Duration,
}

/// One round's outcome: calls per second, the importer's CPU time per
/// call, and calls served per replica.
struct Round {
    calls_per_s: f64,
    client_cpu_us: f64,
    per_replica: Vec<u64>,
}

fn run(dir: &Path, cfg: &Config) -> String {
    let rounds = cfg.rounds;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut one = Vec::new();
    let mut two = Vec::new();
    for r in 0..rounds {
        one.push(round(&rt, dir, cfg, 1, r));
        two.push(round(&rt, dir, cfg, 2, r));
        println!(
            "round {r}: 1 replica {:.0} calls/s, 2 replicas {:.0} calls/s (split {:?})",
            one[r].calls_per_s, two[r].calls_per_s, two[r].per_replica
        );
    }
    let median = |v: &[Round]| {
        let mut x: Vec<f64> = v.iter().map(|r| r.calls_per_s).collect();
        x.sort_by(f64::total_cmp);
        x[x.len() / 2]
    };
    let (t1, t2) = (median(&one), median(&two));
    let cpu = |v: &[Round]| v.iter().map(|r| r.client_cpu_us).sum::<f64>() / v.len() as f64;
    // The smaller replica's share of the calls, worst round.
    let share = two
        .iter()
        .map(|r| {
            let total: u64 = r.per_replica.iter().sum();
            *r.per_replica.iter().min().unwrap_or(&0) as f64 / total.max(1) as f64
        })
        .fold(1.0, f64::min);
    let ratio = t2 / t1;
    println!(
        "throughput: 1 replica {t1:.0} calls/s, 2 replicas {t2:.0} calls/s ({ratio:.2}×); \
         the smaller replica served {:.1}% of the calls at worst",
        share * 100.0
    );
    let mut out = JsonLine::default();
    out.int("work_us", cfg.work.as_micros() as u64)
        .int("concurrency", cfg.concurrency as u64)
        .int("calls_per_round", CALLS)
        .int("rounds", rounds as u64)
        .num("throughput_1_replica_calls_per_s", t1)
        .num("throughput_2_replicas_calls_per_s", t2)
        .num("ratio_2_over_1_replicas", ratio)
        .num("min_replica_share", share)
        .num("importer_cpu_us_per_call_1_replica", cpu(&one))
        .num("importer_cpu_us_per_call_2_replicas", cpu(&two))
        .int(
            "cpus",
            std::thread::available_parallelism().map_or(1, |n| n.get() as u64),
        );
    out.render()
}

/// Starts `replicas` exporters, calls them `CALLS` times from
/// `cfg.concurrency` tasks, stops them.
fn round(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    cfg: &Config,
    replicas: usize,
    r: usize,
) -> Round {
    let mut children = Vec::new();
    let mut ends = Vec::new();
    for replica in 0..replicas {
        let (child, sock) = spawn(dir, &format!("exporter-{r}-{replica}"), replica, cfg.work);
        let (c, s) = channel_pair(&ChannelConfig::default()).expect("channel");
        shm_ipc::fdpass::send_with_fds(sock.as_fd(), b"S", &s.fds()).expect("send end");
        drop(s);
        let (memfd, sock) = c.into_fds();
        ends.push(ChannelFds { memfd, sock });
        children.push(child);
    }
    let concurrency = cfg.concurrency;
    let out = rt.block_on(async move {
        let client =
            Arc::new(AsyncServiceClient::<u64, u64>::open_all(ends).expect("open client ends"));
        let per_replica: Arc<Vec<AtomicU64>> =
            Arc::new((0..replicas).map(|_| AtomicU64::new(0)).collect());
        let drive = |calls: u64| {
            let left = Arc::new(AtomicU64::new(calls));
            let tasks: Vec<_> = (0..concurrency)
                .map(|_| {
                    let (client, left, per) = (client.clone(), left.clone(), per_replica.clone());
                    tokio::spawn(async move {
                        while left
                            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                                n.checked_sub(1)
                            })
                            .is_ok()
                        {
                            let who = client.call(&7, None).await.expect("call").to_native();
                            per[who as usize].fetch_add(1, Ordering::Relaxed);
                        }
                    })
                })
                .collect();
            async move {
                for t in tasks {
                    t.await.expect("task");
                }
            }
        };
        drive(WARMUP).await;
        for c in per_replica.iter() {
            c.store(0, Ordering::Relaxed);
        }
        let cpu = thread_cpu();
        let started = Instant::now();
        drive(CALLS).await;
        let took = started.elapsed();
        let cpu = thread_cpu() - cpu;
        Round {
            calls_per_s: CALLS as f64 / took.as_secs_f64(),
            client_cpu_us: cpu.as_secs_f64() * 1e6 / CALLS as f64,
            per_replica: per_replica
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
        }
    });
    // The client is gone: each exporter sees it leave and exits.
    for mut c in children {
        reap(&mut c);
    }
    out
}

fn spawn(dir: &Path, role: &str, replica: usize, work: Duration) -> (Child, UnixStream) {
    let path = dir.join(format!("{role}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let exe = std::env::current_exe().expect("current exe");
    let child = Command::new(exe)
        .args(["--peer", "exporter"])
        .arg(&path)
        .arg(replica.to_string())
        .arg("--work-us")
        .arg(work.as_micros().to_string())
        .spawn()
        .expect("spawn exporter");
    let (sock, _) = listener.accept().expect("exporter connects");
    (child, sock)
}

/// An exporter replica: serves its channel until the client leaves.
fn exporter(path: &Path, replica: u64, work: Duration) {
    let sock = UnixStream::connect(path).expect("connect");
    let mut buf = [0u8; 1];
    let (_, mut fds) = shm_ipc::fdpass::recv_with_fds(sock.as_fd(), &mut buf).expect("recv end");
    let doorbell = fds.pop().expect("doorbell");
    let memfd = fds.pop().expect("segment");
    let mut server = ServiceServer::<u64, u64>::new();
    server
        .add(ChannelFds {
            memfd,
            sock: doorbell,
        })
        .expect("open");
    server
        .serve_until_clients_leave(|n| {
            // As every ServiceServer: the request was copied out once and
            // validated; it is read in place, the reply serialized into
            // the slot.
            let started = Instant::now();
            let mut x = n.to_native();
            while started.elapsed() < work {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
            }
            std::hint::black_box(x);
            replica
        })
        .expect("serve");
}

/// CPU time (user + system) of the calling thread: the importer's, whose
/// current-thread runtime runs every task on it.
fn thread_cpu() -> Duration {
    // SAFETY: `rusage` is plain data; all zeroes is a valid value.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `u` is a valid, writable rusage for the call.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut u) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(u.ru_utime) + tv(u.ru_stime)
}
