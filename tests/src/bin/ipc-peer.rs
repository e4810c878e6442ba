//! The other process of the shm-ipc end-to-end tests.
//!
//! `ipc-peer ROLE SOCKET`: connects to SOCKET, receives channel descriptors
//! on it, and plays ROLE:
//! - `echo-server`: receives server ends (tag `S`) until tag `G`, then
//!   serves them all, echoing each request, until every client is gone.
//! - `sum-server`: like `echo-server` but replies with the 8-byte wrapping
//!   sum of every request byte.
//! - `typed-echo-server`: like `echo-server`, through the SDK's typed
//!   server (`ServiceServer<Echo, Echo>`), answering each request with a
//!   copy of itself.
//! - `scribbler`: receives a segment (tag `M`) and writes pseudo-random
//!   words all over it until killed.
//! - `evil-client`: receives a client end (tag `C`), then alternates sending
//!   requests with scribbling over its own segment, until killed.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use ember_tests::{recv_fds, Echo};
use module_runtime::sdk::ChannelFds;
use module_runtime::service::ServiceServer;
use shm_ipc::channel::{Client, ClientEnd, ServerEnd};
use shm_ipc::service::Server;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, role, path] = args.as_slice() else {
        eprintln!("usage: ipc-peer ROLE SOCKET");
        std::process::exit(2);
    };
    let sock = UnixStream::connect(path).expect("connect");
    match role.as_str() {
        "echo-server" => serve(&sock, |req, w| {
            w.write(&req.to_vec()).map_err(|e| e.to_string())
        }),
        "sum-server" => serve(&sock, |req, w| {
            let mut sum = 0u64;
            req.for_each_chunk(|c| sum = c.iter().fold(sum, |s, &b| s.wrapping_add(b as u64)));
            w.write(&sum.to_le_bytes()).map_err(|e| e.to_string())
        }),
        "typed-echo-server" => typed_echo(&sock),
        "scribbler" => {
            let (_, fds) = recv_fds(&sock);
            scribble_forever(&fds[0], None);
        }
        "evil-client" => {
            let (_, mut fds) = recv_fds(&sock);
            let sock_fd = fds.pop().expect("doorbell");
            let memfd = fds.pop().expect("segment");
            let spare = memfd.try_clone().expect("dup");
            let mut client = Client::open(ClientEnd::from_fds(memfd, sock_fd)).expect("open");
            scribble_forever(&spare, Some(&mut client));
        }
        other => {
            eprintln!("unknown role {other}");
            std::process::exit(2);
        }
    }
}

fn serve(
    sock: &UnixStream,
    handler: impl FnMut(shm_ipc::ShmSlice<'_>, &mut shm_ipc::SlotWriter<'_>) -> Result<(), String>,
) {
    let mut server = Server::new();
    loop {
        let (tag, mut fds) = recv_fds(sock);
        match tag {
            Some(b'S') => {
                let s = fds.pop().expect("doorbell");
                let m = fds.pop().expect("segment");
                server
                    .add(ServerEnd::from_fds(m, s))
                    .expect("open server end");
            }
            _ => break,
        }
    }
    let mut handler = handler;
    let gone = server
        .run(None, |_, req, w| handler(req, w))
        .expect("serve");
    for g in gone {
        eprintln!("ipc-peer: client left: {g:?}");
    }
}

fn typed_echo(sock: &UnixStream) {
    let mut server = ServiceServer::<Echo, Echo>::new();
    while let (Some(b'S'), mut fds) = recv_fds(sock) {
        let sock = fds.pop().expect("doorbell");
        let memfd = fds.pop().expect("segment");
        server
            .add(ChannelFds { memfd, sock })
            .expect("open server end");
    }
    server
        .serve_until_clients_leave(|req| Echo {
            n: req.n.to_native(),
            bytes: req.bytes.to_vec(),
        })
        .expect("serve");
}

/// xorshift: cheap, deterministic garbage.
fn next(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}

fn scribble_forever(memfd: &OwnedFd, mut client: Option<&mut Client>) -> ! {
    let len = nix::sys::stat::fstat(memfd).expect("fstat").st_size as usize;
    let map = memmap2::MmapOptions::new()
        .len(len)
        .map_raw(memfd)
        .expect("map");
    let words = len / 4;
    let mut state = 0x9e37_79b9_7f4a_7c15_u64 ^ std::process::id() as u64;
    loop {
        for _ in 0..64 {
            let r = next(&mut state);
            let at = (r as usize >> 8) % words;
            // SAFETY: `at < len / 4`, so the 4-aligned word lies inside our
            // own live mapping; writing through an atomic is how this test
            // plays a hostile peer without creating references.
            let word = unsafe { &*(map.as_mut_ptr().add(at * 4) as *const AtomicU32) };
            word.store((r >> 32) as u32, Ordering::Relaxed);
        }
        if let Some(c) = client.as_deref_mut() {
            let _ = c.call_deadline(b"junk", Instant::now() + Duration::from_millis(1));
        } else {
            std::thread::yield_now();
        }
    }
}
