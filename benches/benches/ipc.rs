//! IPC benchmark: shm-ipc, raw and typed (the SDK's rkyv clients and
//! servers, the path modules use), against a Unix stream socket and against
//! the floor of this machine (a bare cache-line ping-pong, a plain memcpy),
//! two real processes, the same exchanges, in the same run.
//!
//! `cargo bench --bench ipc -- --json` prints human-readable lines, then one
//! JSON object as the last line. The peers are this same binary re-executed
//! with `--peer ROLE SOCKET`. `--no-pin` leaves both processes to the
//! scheduler (by default the bench runs on CPU 0 and every peer on CPU 1);
//! `--rounds` prints each round's medians.
//!
//! Where the host runs this VM's two vCPUs changes over seconds (a bare
//! ping-pong here moves between ~0.2 and ~0.5 µs, a 1 MiB transfer between
//! ~50 and ~220 µs), so every comparison is made in alternating rounds and
//! the ratios are medians of per-round ratios.

use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ember_benches::{json_requested, reap, word_sum, JsonLine, Samples};
use module_runtime::sdk::ChannelFds;
use module_runtime::service::{ServiceClient, ServiceServer};
use shm_ipc::channel::{channel_pair, ChannelConfig, Client, ServerEnd, WaitStrategy};
use shm_ipc::service::Server;

const SMALL: usize = 64;
const BULK: usize = 1 << 20;
/// Alternating rounds of the 64 B exchanges (floor, raw, typed, socket).
const SMALL_ROUNDS: usize = 15;
/// Alternating rounds of the 1 MiB exchanges (raw, typed, socket, memcpy).
const BULK_ROUNDS: usize = 21;
/// Ping-pong lines in the floor's segment: `ping` at 0, `pong` two lines on
/// (so no adjacent-line prefetch couples them).
const PONG: usize = 128;

/// The typed 64 B message: its archive is exactly 64 bytes.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Small {
    bytes: [u8; SMALL],
}

/// The typed 1 MiB request.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Bulk {
    data: Vec<u8>,
}

/// The typed reply to a bulk request: the word sum, padded to 64 bytes as
/// the raw and socket replies are.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
struct Sum {
    sum: u64,
    pad: [u8; SMALL - 8],
}

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

/// Whether `--rounds` asked for each round's medians on stderr.
fn verbose() -> bool {
    std::env::args().any(|a| a == "--rounds")
}

/// Whether processes are pinned (bench on CPU 0, peers on CPU 1): unless
/// `--no-pin`, on a machine with two CPUs or more online (counted without
/// the affinity mask, which a peer inherits from the pinned bench).
fn pinning() -> bool {
    !std::env::args().any(|a| a == "--no-pin") && online_cpus() >= 2
}

/// CPUs online (whatever this process's affinity).
fn online_cpus() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { nix::libc::sysconf(nix::libc::_SC_NPROCESSORS_ONLN) };
    n.max(0) as u64
}

/// Pins the calling process to `cpu`.
fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes
    // inside it (cpu < CPU_SETSIZE); sched_setaffinity only reads it.
    let ok = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
    };
    assert!(ok, "sched_setaffinity({cpu}) failed");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn min_max(v: &[f64]) -> (f64, f64) {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn run(dir: &Path) -> String {
    let pinned = pinning();
    if pinned {
        pin(0);
    }
    let mut out = JsonLine::default();
    let small_cfg = ChannelConfig {
        slots: 16,
        slot_capacity: 4096,
    };

    // 64 B round trips, default wait strategy (bounded spin, then park),
    // in alternating rounds: the floor (two processes passing one cache
    // line back and forth), raw shm-ipc (the request written into the
    // slot, read out of it with `copy_to`), typed (ServiceClient and
    // ServiceServer), and the Unix socket.
    let (mut floor_child, mut floor) = floor_peer(dir);
    let (mut raw_child, mut client) = shm_peer(dir, "shm-spin", &small_cfg);
    let (mut typed_child, mut typed) = typed_peer::<Small, Small>(dir, "typed-small", &small_cfg);
    let (mut uds_child, mut sock) = uds_peer(dir, "uds-small");
    let req = [7u8; SMALL];
    let mut reply = [0u8; SMALL];
    let small = Small { bytes: req };
    let (mut fl, mut rtt, mut ty, mut uds) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    let (mut typed_over_raw, mut uds_over_typed, mut raw_over_floor) =
        (Vec::new(), Vec::new(), Vec::new());
    for r in 0..SMALL_ROUNDS + 1 {
        let mut f = floor.measure(20_000, 2_000);
        let mut s = measure(20_000, 2_000, || {
            client
                .call_with(None, |w| w.write(&req), |r| r.copy_to(&mut reply))
                .expect("call");
        });
        let mut t = measure(20_000, 2_000, || {
            let r = typed.call(&small, None).expect("typed call");
            reply.copy_from_slice(&r.bytes);
        });
        let mut u = measure(2_000, 200, || {
            sock.write_all(&req).expect("write");
            sock.read_exact(&mut reply).expect("read");
        });
        if r == 0 {
            continue; // warm-up round
        }
        let (f50, s50, t50, u50) = (
            f.percentile(50.0) as f64,
            s.percentile(50.0) as f64,
            t.percentile(50.0) as f64,
            u.percentile(50.0) as f64,
        );
        if verbose() {
            eprintln!(
                "  64 B round {r:2}: floor {f50} ns, raw {s50} ns, typed {t50} ns, uds {u50} ns"
            );
        }
        typed_over_raw.push(t50 / s50);
        uds_over_typed.push(u50 / t50);
        raw_over_floor.push(s50 / f50);
        fl.extend(f);
        rtt.extend(s);
        ty.extend(t);
        uds.extend(u);
    }
    assert_eq!(reply, req, "the typed server echoes");
    // Idle: the raw server has nothing to do for a second; how much CPU
    // burns?
    let idle_pct = idle_cpu_percent(raw_child.id(), Duration::from_secs(1));
    drop(client);
    drop(typed);
    drop(sock);
    floor.stop();
    for c in [
        &mut raw_child,
        &mut typed_child,
        &mut uds_child,
        &mut floor_child,
    ] {
        reap(c);
    }

    let (mut peer, mut client) = shm_peer(dir, "shm-park", &small_cfg);
    client.set_wait(WaitStrategy::PARK);
    let mut parked = measure(20_000, 2_000, || {
        client
            .call_with(None, |w| w.write(&req), |r| r.copy_to(&mut reply))
            .expect("call");
    });
    drop(client);
    reap(&mut peer);

    // 1 MiB request, 64 B reply, the receiver reads every byte. Each side
    // produces the request the way its transport allows: raw shm-ipc fills
    // the loaned slot in place (no copy) and the server sums it in place;
    // typed fills its request's `Vec` and the client serializes it into the
    // slot (one copy), the server copies it out (one copy), validates it
    // and sums it; the socket client fills a buffer and writes it, the
    // socket server reads it into a buffer (two copies, through the
    // kernel) and sums it. The floor is a plain memcpy of 1 MiB between
    // two buffers of this process.
    let bulk_cfg = ChannelConfig {
        slots: 2,
        slot_capacity: BULK as u32,
    };
    // An archived `Vec<u8>` is its bytes plus an 8-byte header.
    let typed_bulk_cfg = ChannelConfig {
        slots: 2,
        slot_capacity: (BULK + 64) as u32,
    };
    let (mut shm_child, mut client) = shm_peer(dir, "shm-spin", &bulk_cfg);
    let (mut typed_child, mut typed) = typed_peer::<Bulk, Sum>(dir, "typed-bulk", &typed_bulk_cfg);
    let (mut uds_child, mut sock) = uds_peer(dir, "uds-bulk");
    let mut round = 0u8;
    let mut big = vec![0u8; BULK];
    let mut bulk_req = Bulk {
        data: vec![0u8; BULK],
    };
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
    let mut typed_call = |round: u8| {
        bulk_req.data.fill(round);
        let r = typed.call(&bulk_req, None).expect("typed bulk call");
        assert_eq!(r.sum, expected_sum(round));
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
    let (mut src, mut dst) = (vec![1u8; BULK], vec![0u8; BULK]);
    let mut memcpy = |round: u8| {
        src[0] = round;
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
    };
    // What the typed exchange does to the bytes, in one process with no
    // channel: produce the request, copy it (into the slot), copy it again
    // (out of it), read every byte.
    let (mut t_src, mut t_slot, mut t_dst) = (vec![0u8; BULK], vec![0u8; BULK], vec![0u8; BULK]);
    let mut typed_floor = |round: u8| {
        t_src.fill(round);
        t_slot.copy_from_slice(&t_src);
        t_dst.copy_from_slice(std::hint::black_box(&t_slot));
        assert_eq!(word_sum(std::hint::black_box(&t_dst)), expected_sum(round));
    };
    let mut typed_floor_bulk = Samples::default();
    let (mut bulk, mut typed_bulk, mut uds_bulk, mut floor_bulk) = (
        Samples::default(),
        Samples::default(),
        Samples::default(),
        Samples::default(),
    );
    let (mut bulk_ratios, mut typed_bulk_ratios) = (Vec::new(), Vec::new());
    for r in 0..BULK_ROUNDS + 1 {
        let mut s = measure(200, 20, || {
            round = round.wrapping_add(1);
            shm_call(round)
        });
        let mut t = measure(200, 20, || {
            round = round.wrapping_add(1);
            typed_call(round)
        });
        let mut u = measure(50, 20, || {
            round = round.wrapping_add(1);
            uds_call(round)
        });
        let m = measure(200, 20, || {
            round = round.wrapping_add(1);
            memcpy(round)
        });
        let tf = measure(100, 10, || {
            round = round.wrapping_add(1);
            typed_floor(round)
        });
        if r == 0 {
            continue; // warm-up round
        }
        let (s50, t50, u50) = (
            s.percentile(50.0) as f64,
            t.percentile(50.0) as f64,
            u.percentile(50.0) as f64,
        );
        if verbose() {
            let mut m = m.clone();
            eprintln!(
                "  1 MiB round {r:2}: raw {s50} ns, typed {t50} ns, uds {u50} ns, memcpy {} ns",
                m.percentile(50.0)
            );
        }
        bulk_ratios.push(u50 / s50);
        typed_bulk_ratios.push(u50 / t50);
        bulk.extend(s);
        typed_bulk.extend(t);
        uds_bulk.extend(u);
        floor_bulk.extend(m);
        typed_floor_bulk.extend(tf);
    }
    drop(client);
    drop(typed);
    drop(sock);
    for c in [&mut shm_child, &mut typed_child, &mut uds_child] {
        reap(c);
    }

    let (f50, r50, r99) = (
        fl.percentile(50.0),
        rtt.percentile(50.0),
        rtt.percentile(99.0),
    );
    let (t50, t99) = (ty.percentile(50.0), ty.percentile(99.0));
    let (u50, u99) = (uds.percentile(50.0), uds.percentile(99.0));
    let p50 = parked.percentile(50.0);
    let (b50, tb50, ub50, fb50) = (
        bulk.percentile(50.0),
        typed_bulk.percentile(50.0),
        uds_bulk.percentile(50.0),
        floor_bulk.percentile(50.0),
    );
    let tf50 = typed_floor_bulk.percentile(50.0);
    let ratio_typed_raw = median(typed_over_raw.clone());
    let ratio_uds_typed = median(uds_over_typed.clone());
    let ratio_raw_floor = median(raw_over_floor.clone());
    let bulk_ratio = median(bulk_ratios.clone());
    let typed_bulk_ratio = median(typed_bulk_ratios.clone());
    let (brmin, brmax) = min_max(&bulk_ratios);
    let (tbmin, tbmax) = min_max(&typed_bulk_ratios);
    let (utmin, utmax) = min_max(&uds_over_typed);
    eprintln!(
        "64 B round trip   floor p50 {f50} ns | shm p50 {r50} ns p99 {r99} ns ({ratio_raw_floor:.2}x floor) | typed p50 {t50} ns p99 {t99} ns ({ratio_typed_raw:.2}x raw) | uds p50 {u50} ns p99 {u99} ns | uds/typed {ratio_uds_typed:.1}x (median of {SMALL_ROUNDS} alternating rounds; min {utmin:.1}x, max {utmax:.1}x)"
    );
    eprintln!(
        "64 B parked       shm p50 {p50} ns | parked/uds {:.2}x",
        p50 as f64 / u50 as f64
    );
    eprintln!(
        "1 MiB request     memcpy floor p50 {fb50} ns | typed floor p50 {tf50} ns | shm p50 {b50} ns | typed p50 {tb50} ns | uds p50 {ub50} ns | uds/shm {bulk_ratio:.1}x (min {brmin:.1}x, max {brmax:.1}x) | uds/typed {typed_bulk_ratio:.1}x (min {tbmin:.1}x, max {tbmax:.1}x); medians of {BULK_ROUNDS} alternating rounds"
    );
    eprintln!("idle server CPU   {idle_pct:.3} %");
    let targets_met = ratio_typed_raw <= 2.0
        && ratio_uds_typed >= 50.0
        && typed_bulk_ratio >= 4.0
        && bulk_ratio >= 5.0;
    out.int("rtt_64b_p50_ns", r50)
        .int("rtt_64b_p99_ns", r99)
        .int("typed_rtt_64b_p50_ns", t50)
        .int("typed_rtt_64b_p99_ns", t99)
        .int("floor_rtt_64b_p50_ns", f50)
        .int("uds_rtt_64b_p50_ns", u50)
        .int("uds_rtt_64b_p99_ns", u99)
        .int("parked_rtt_64b_p50_ns", p50)
        .int("bulk_1mib_p50_ns", b50)
        .int("typed_bulk_1mib_p50_ns", tb50)
        .int("uds_bulk_1mib_p50_ns", ub50)
        .int("bulk_floor_memcpy_1mib_ns", fb50)
        .int("typed_bulk_floor_1mib_ns", tf50)
        .num("ratio_uds_over_shm_64b", u50 as f64 / r50 as f64)
        .num("ratio_typed_over_raw_64b", ratio_typed_raw)
        .num("ratio_uds_over_typed_64b", ratio_uds_typed)
        .num("ratio_uds_over_typed_64b_min", utmin)
        .num("ratio_uds_over_typed_64b_max", utmax)
        .num("ratio_raw_over_floor_64b", ratio_raw_floor)
        .num("ratio_uds_over_floor_64b", u50 as f64 / f50 as f64)
        .int("small_rounds", SMALL_ROUNDS as u64)
        .num("ratio_parked_over_uds", p50 as f64 / u50 as f64)
        .num("ratio_uds_over_shm_bulk", bulk_ratio)
        .num("ratio_uds_over_shm_bulk_min", brmin)
        .num("ratio_uds_over_shm_bulk_max", brmax)
        .num("ratio_uds_over_typed_bulk", typed_bulk_ratio)
        .num("ratio_uds_over_typed_bulk_min", tbmin)
        .num("ratio_uds_over_typed_bulk_max", tbmax)
        .num("ratio_shm_bulk_over_memcpy", b50 as f64 / fb50 as f64)
        .num(
            "ratio_typed_bulk_over_typed_floor",
            tb50 as f64 / tf50 as f64,
        )
        .int("bulk_rounds", BULK_ROUNDS as u64)
        .num("idle_server_cpu_pct", idle_pct)
        .bool("pinned", pinned)
        .bool("targets_met", targets_met)
        .int("cpus", online_cpus());
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
    let mut cmd = Command::new(exe);
    cmd.args(["--peer", role]).arg(&path);
    if !pinning() {
        cmd.arg("--no-pin");
    }
    let child = cmd.spawn().expect("spawn peer");
    let (sock, _) = listener.accept().expect("peer connects");
    (child, sock)
}

fn shm_peer(dir: &Path, role: &str, cfg: &ChannelConfig) -> (Child, Client) {
    let (child, sock) = spawn(dir, role);
    let (c, s) = channel_pair(cfg).expect("channel");
    shm_ipc::fdpass::send_with_fds(sock.as_fd(), b"S", &s.fds()).expect("send ends");
    (child, Client::open(c).expect("open client"))
}

fn typed_peer<Req, Resp>(
    dir: &Path,
    role: &str,
    cfg: &ChannelConfig,
) -> (Child, ServiceClient<Req, Resp>)
where
    Req: module_runtime::service::Wire,
    Resp: module_runtime::service::Wire,
{
    let (child, sock) = spawn(dir, role);
    let (c, s) = channel_pair(cfg).expect("channel");
    shm_ipc::fdpass::send_with_fds(sock.as_fd(), b"S", &s.fds()).expect("send ends");
    let (memfd, sock) = c.into_fds();
    let client = ServiceClient::open(ChannelFds { memfd, sock }).expect("open typed client");
    (child, client)
}

fn uds_peer(dir: &Path, role: &str) -> (Child, UnixStream) {
    spawn(dir, role)
}

/// The floor: a word in a shared page, flipped between two processes.
struct Floor {
    sock: UnixStream,
    page: Page,
    next: u32,
}

fn floor_peer(dir: &Path) -> (Child, Floor) {
    let (child, sock) = spawn(dir, "floor");
    let memfd = shm_ipc::segment::create_memfd(c"ember-bench-floor", 4096).expect("memfd");
    shm_ipc::fdpass::send_with_fds(sock.as_fd(), b"M", &[memfd.as_fd()]).expect("send page");
    let page = Page::map(memfd);
    (
        child,
        Floor {
            sock,
            page,
            next: 0,
        },
    )
}

impl Floor {
    /// Round trips through the peer: write `ping`, spin until `pong`
    /// matches.
    fn measure(&mut self, iters: usize, warmup: usize) -> Samples {
        let n = (iters + warmup) as u32;
        self.sock
            .write_all(&n.to_le_bytes())
            .expect("start floor round");
        let (ping, pong) = (self.page.word(0), self.page.word(PONG));
        let mut next = self.next;
        let s = measure(iters, warmup, || {
            next = next.wrapping_add(1);
            // Release/Acquire pair with the peer's loads and stores.
            ping.store(next, Ordering::Release);
            while pong.load(Ordering::Acquire) != next {
                std::hint::spin_loop();
            }
        });
        self.next = next;
        let mut done = [0u8; 1];
        self.sock.read_exact(&mut done).expect("floor round over");
        s
    }

    fn stop(&mut self) {
        let _ = self.sock.write_all(&0u32.to_le_bytes());
    }
}

/// One shared 4 KiB page mapped read-write.
struct Page {
    ptr: *mut u8,
    _fd: OwnedFd,
}

impl Page {
    fn map(fd: OwnedFd) -> Self {
        // SAFETY: a fresh shared mapping of a 4096-byte memfd; nothing else
        // in this process maps that range.
        let ptr = unsafe {
            nix::libc::mmap(
                std::ptr::null_mut(),
                4096,
                nix::libc::PROT_READ | nix::libc::PROT_WRITE,
                nix::libc::MAP_SHARED | nix::libc::MAP_POPULATE,
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                0,
            )
        };
        assert_ne!(ptr, nix::libc::MAP_FAILED, "mmap floor page");
        Self {
            ptr: ptr.cast(),
            _fd: fd,
        }
    }

    /// The atomic word at `off` (4-aligned, inside the page).
    fn word(&self, off: usize) -> &AtomicU32 {
        assert!(off % 4 == 0 && off + 4 <= 4096);
        // SAFETY: in bounds and aligned (checked); the mapping lives as
        // long as `self`; AtomicU32 tolerates the other process's writes.
        unsafe { &*self.ptr.add(off).cast::<AtomicU32>() }
    }
}

impl Drop for Page {
    fn drop(&mut self) {
        // SAFETY: unmaps the mapping made in `map`; no reference into it
        // outlives `self`.
        unsafe { nix::libc::munmap(self.ptr.cast(), 4096) };
    }
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

/// Receives one channel's server end (tag `S`) on `sock`.
fn recv_server_end(sock: &UnixStream) -> (OwnedFd, OwnedFd) {
    let mut buf = [0u8; 1];
    let (_, mut fds) = shm_ipc::fdpass::recv_with_fds(sock.as_fd(), &mut buf).expect("recv ends");
    let doorbell = fds.pop().expect("doorbell");
    let memfd = fds.pop().expect("segment");
    (memfd, doorbell)
}

fn peer(role: &str, path: &Path) {
    if pinning() {
        pin(1);
    }
    let mut sock = UnixStream::connect(path).expect("connect");
    match role {
        "shm-spin" | "shm-park" => {
            let (memfd, doorbell) = recv_server_end(&sock);
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
        "typed-small" => {
            let (memfd, sock) = recv_server_end(&sock);
            let mut server = ServiceServer::<Small, Small>::new();
            server.add(ChannelFds { memfd, sock }).expect("open");
            server
                .serve_until_clients_leave(|req| Small { bytes: req.bytes })
                .expect("serve");
        }
        "typed-bulk" => {
            let (memfd, sock) = recv_server_end(&sock);
            let mut server = ServiceServer::<Bulk, Sum>::new();
            server.add(ChannelFds { memfd, sock }).expect("open");
            server
                .serve_until_clients_leave(|req| Sum {
                    sum: word_sum(req.data.as_slice()),
                    pad: [0; SMALL - 8],
                })
                .expect("serve");
        }
        "floor" => {
            let mut buf = [0u8; 1];
            let (_, mut fds) =
                shm_ipc::fdpass::recv_with_fds(sock.as_fd(), &mut buf).expect("recv page");
            let page = Page::map(fds.pop().expect("page"));
            let (ping, pong) = (page.word(0), page.word(PONG));
            let mut seen = 0u32;
            let mut n = [0u8; 4];
            // Parked on the socket between rounds, spinning during one.
            while sock.read_exact(&mut n).is_ok() {
                let n = u32::from_le_bytes(n);
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    let want = seen.wrapping_add(1);
                    // Acquire/Release pair with the bench's stores and loads.
                    while ping.load(Ordering::Acquire) != want {
                        std::hint::spin_loop();
                    }
                    pong.store(want, Ordering::Release);
                    seen = want;
                }
                sock.write_all(&[1]).expect("round over");
            }
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
