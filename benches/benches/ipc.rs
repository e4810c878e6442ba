//! IPC benchmark: shm-ipc against a Unix stream socket, two real processes,
//! the same exchanges, in the same run.
//!
//! `cargo bench --bench ipc -- --json` prints human-readable lines, then one
//! JSON object as the last line. The peer is this same binary re-executed
//! with `--peer ROLE SOCKET`.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use ember_benches::{json_requested, word_sum, JsonLine, Samples};
use shm_ipc::channel::{channel_pair, ChannelConfig, Client, ServerEnd, WaitStrategy};
use shm_ipc::service::Server;

const SMALL: usize = 64;
const BULK: usize = 1 << 20;
/// Alternating shm/UDS rounds of the 1 MiB exchange.
const BULK_ROUNDS: usize = 15;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--peer") {
        peer(&args[i + 1], Path::new(&args[i + 2]));
        return;
    }
    let json = json_requested();
    let dir = std::env::temp_dir().join(format!("ember-bench-ipc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let result = std::panic::catch_unwind(|| run(&dir));
    let _ = std::fs::remove_dir_all(&dir);
    let line = match result {
        Ok(line) => line,
        Err(p) => std::panic::resume_unwind(p),
    };
    if json {
        println!("{line}");
    }
}

fn run(dir: &Path) -> String {
    let mut out = JsonLine::default();
    let small_cfg = ChannelConfig {
        slots: 16,
        slot_capacity: 4096,
    };
    let bulk_cfg = ChannelConfig {
        slots: 2,
        slot_capacity: BULK as u32,
    };

    // 64 B round trip, default wait strategy (bounded spin, then park).
    let (mut peer, mut client) = shm_peer(dir, "shm-spin", &small_cfg);
    let req = [7u8; SMALL];
    let mut reply = [0u8; SMALL];
    let mut rtt = measure(200_000, 20_000, || {
        client
            .call_with(None, |w| w.write(&req), |r| r.copy_to(&mut reply))
            .expect("call");
    });
    // Idle: the server has nothing to do for a second; how much CPU burns?
    let idle_pct = idle_cpu_percent(peer.id(), Duration::from_secs(1));
    drop(client);
    reap(&mut peer);

    let (mut peer, mut client) = shm_peer(dir, "shm-park", &small_cfg);
    client.set_wait(WaitStrategy::PARK);
    let mut parked = measure(20_000, 2_000, || {
        client
            .call_with(None, |w| w.write(&req), |r| r.copy_to(&mut reply))
            .expect("call");
    });
    drop(client);
    reap(&mut peer);

    let (mut peer, mut sock) = uds_peer(dir, "uds-small");
    let mut uds = measure(20_000, 2_000, || {
        sock.write_all(&req).expect("write");
        sock.read_exact(&mut reply).expect("read");
    });
    drop(sock);
    reap(&mut peer);

    // 1 MiB request, 64 B reply. Each side produces the request the way its
    // transport allows: shm-ipc fills the loaned slot in place, the socket
    // fills a buffer and writes it. The receiver reads every byte.
    //
    // Both transports move 1 MiB between cores, so both depend on where the
    // host runs this VM's two vCPUs, which changes over seconds (a raw C
    // ring here flips between ~50 and ~220 us). So the two are measured in
    // alternating rounds, each round a few hundred milliseconds, and each
    // round's ratio is kept: the headline ratio is the median round's.
    let (mut shm_peer_child, mut client) = shm_peer(dir, "shm-spin", &bulk_cfg);
    let (mut uds_peer_child, mut sock) = uds_peer(dir, "uds-bulk");
    let mut round = 0u8;
    let mut big = vec![0u8; BULK];
    let mut shm_call = |round: u8| {
        let sum = client
            .call_with(
                None,
                |w| w.fill(round, BULK),
                |r| {
                    let mut s = [0u8; 8];
                    r.slice(0, 8).copy_to(&mut s);
                    u64::from_le_bytes(s)
                },
            )
            .expect("bulk call");
        assert_eq!(sum, expected_sum(round));
    };
    let mut uds_call = |round: u8| {
        big.fill(round);
        sock.write_all(&big).expect("write");
        sock.read_exact(&mut reply).expect("read");
        assert_eq!(
            u64::from_le_bytes(reply[..8].try_into().unwrap()),
            expected_sum(round)
        );
    };
    let (mut bulk, mut uds_bulk) = (Samples::default(), Samples::default());
    let mut round_ratios = Vec::new();
    for r in 0..BULK_ROUNDS + 1 {
        let mut s = measure(200, 20, || {
            round = round.wrapping_add(1);
            shm_call(round)
        });
        let mut u = measure(50, 20, || {
            round = round.wrapping_add(1);
            uds_call(round)
        });
        if r == 0 {
            continue; // warm-up round
        }
        round_ratios.push(u.percentile(50.0) as f64 / s.percentile(50.0) as f64);
        bulk.extend(s);
        uds_bulk.extend(u);
    }
    round_ratios.sort_by(f64::total_cmp);
    let bulk_ratio = round_ratios[round_ratios.len() / 2];
    drop(client);
    drop(sock);
    reap(&mut shm_peer_child);
    reap(&mut uds_peer_child);

    let (r50, r99) = (rtt.percentile(50.0), rtt.percentile(99.0));
    let (u50, u99) = (uds.percentile(50.0), uds.percentile(99.0));
    let p50 = parked.percentile(50.0);
    let (b50, ub50) = (bulk.percentile(50.0), uds_bulk.percentile(50.0));
    eprintln!("64 B round trip   shm p50 {r50} ns p99 {r99} ns | uds p50 {u50} ns p99 {u99} ns | uds/shm {:.1}x", u50 as f64 / r50 as f64);
    eprintln!(
        "64 B parked       shm p50 {p50} ns | parked/uds {:.2}x",
        p50 as f64 / u50 as f64
    );
    eprintln!(
        "1 MiB request     shm p50 {b50} ns | uds p50 {ub50} ns | uds/shm {bulk_ratio:.1}x (median of {BULK_ROUNDS} alternating rounds; min {:.1}x, max {:.1}x)",
        round_ratios[0],
        round_ratios[round_ratios.len() - 1],
    );
    eprintln!("idle server CPU   {idle_pct:.3} %");
    out.int("rtt_64b_p50_ns", r50)
        .int("rtt_64b_p99_ns", r99)
        .int("uds_rtt_64b_p50_ns", u50)
        .int("uds_rtt_64b_p99_ns", u99)
        .int("parked_rtt_64b_p50_ns", p50)
        .int("bulk_1mib_p50_ns", b50)
        .int("uds_bulk_1mib_p50_ns", ub50)
        .num("ratio_uds_over_shm_64b", u50 as f64 / r50 as f64)
        .num("ratio_parked_over_uds", p50 as f64 / u50 as f64)
        .num("ratio_uds_over_shm_bulk", bulk_ratio)
        .int("bulk_rounds", BULK_ROUNDS as u64)
        .num("ratio_uds_over_shm_bulk_min", round_ratios[0])
        .num(
            "ratio_uds_over_shm_bulk_max",
            round_ratios[round_ratios.len() - 1],
        )
        .num("idle_server_cpu_pct", idle_pct)
        .int(
            "cpus",
            std::thread::available_parallelism().map_or(0, |n| n.get() as u64),
        );
    out.render()
}

/// `word_sum` of a bulk request made of `byte` repeated.
fn expected_sum(byte: u8) -> u64 {
    (BULK as u64 / 8).wrapping_mul(u64::from_le_bytes([byte; 8]))
}

fn measure(iters: usize, warmup: usize, mut f: impl FnMut()) -> Samples {
    for _ in 0..warmup {
        f();
    }
    let mut s = Samples::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        f();
        s.push(t.elapsed());
    }
    s
}

fn spawn(dir: &Path, role: &str) -> (Child, UnixStream) {
    let path: PathBuf = dir.join(format!("{role}.sock"));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).expect("bind");
    let exe = std::env::current_exe().expect("current exe");
    let child = Command::new(exe)
        .args(["--peer", role])
        .arg(&path)
        .spawn()
        .expect("spawn peer");
    let (sock, _) = listener.accept().expect("peer connects");
    (child, sock)
}

fn shm_peer(dir: &Path, role: &str, cfg: &ChannelConfig) -> (Child, Client) {
    let (child, sock) = spawn(dir, role);
    let (c, s) = channel_pair(cfg).expect("channel");
    shm_ipc::fdpass::send_with_fds(sock.as_fd(), b"S", &s.fds()).expect("send ends");
    (child, Client::open(c).expect("open client"))
}

fn uds_peer(dir: &Path, role: &str) -> (Child, UnixStream) {
    spawn(dir, role)
}

fn reap(child: &mut Child) {
    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// CPU time (user + system) the process used over `window`, in percent.
fn idle_cpu_percent(pid: u32, window: Duration) -> f64 {
    let ticks = |pid: u32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
    };
    // Give the server time to stop spinning and park first.
    std::thread::sleep(Duration::from_millis(50));
    let before = ticks(pid);
    std::thread::sleep(window);
    let used = ticks(pid) - before;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as f64;
    used as f64 / hz / window.as_secs_f64() * 100.0
}

fn peer(role: &str, path: &Path) {
    let mut sock = UnixStream::connect(path).expect("connect");
    match role {
        "shm-spin" | "shm-park" => {
            let mut buf = [0u8; 1];
            let (_, mut fds) =
                shm_ipc::fdpass::recv_with_fds(sock.as_fd(), &mut buf).expect("recv ends");
            let doorbell = fds.pop().expect("doorbell");
            let memfd = fds.pop().expect("segment");
            let mut server = Server::new();
            if role == "shm-park" {
                server.set_wait(WaitStrategy::PARK);
            }
            server
                .add(ServerEnd::from_fds(memfd, doorbell))
                .expect("open");
            server
                .run(None, |_, req, w| {
                    if req.len() <= SMALL {
                        let mut b = [0u8; SMALL];
                        req.copy_to(&mut b[..req.len()]);
                        w.write(&b[..req.len()]).map_err(|e| e.to_string())
                    } else {
                        let sum = req.fold_words(0u64, u64::wrapping_add);
                        let mut b = [0u8; SMALL];
                        b[..8].copy_from_slice(&sum.to_le_bytes());
                        w.write(&b).map_err(|e| e.to_string())
                    }
                })
                .expect("serve");
        }
        "uds-small" => {
            let mut b = [0u8; SMALL];
            while sock.read_exact(&mut b).is_ok() {
                sock.write_all(&b).expect("write");
            }
        }
        "uds-bulk" => {
            let mut b = vec![0u8; BULK];
            while sock.read_exact(&mut b).is_ok() {
                let mut r = [0u8; SMALL];
                r[..8].copy_from_slice(&word_sum(&b).to_le_bytes());
                sock.write_all(&r).expect("write");
            }
        }
        other => panic!("unknown peer role {other}"),
    }
}
