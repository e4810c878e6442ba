//! shm-ipc between real processes: a server process (raw and typed), a
//! crashing server, and peers that write garbage over the shared pages while
//! the other side works.

use std::time::{Duration, Instant};

use ember_tests::{send_fds, spawn_peer, ArchivedEcho, Echo, TempDir};
use module_runtime::sdk::ChannelFds;
use module_runtime::service::{AsyncServiceClient, ServiceClient, ServiceError};
use shm_ipc::channel::{channel_pair, ChannelConfig, ChannelError, Client};

const PEER: &str = env!("CARGO_BIN_EXE_ipc-peer");

fn server_with_clients(
    dir: &TempDir,
    role: &str,
    cfg: &ChannelConfig,
    n: usize,
) -> (ember_tests::ChildGuard, Vec<shm_ipc::channel::ClientEnd>) {
    let (child, sock) = spawn_peer(dir, PEER, &[role]);
    let mut clients = Vec::new();
    for _ in 0..n {
        let (c, s) = channel_pair(cfg).unwrap();
        send_fds(&sock, b'S', &s.fds());
        clients.push(c);
    }
    send_fds(&sock, b'G', &[]);
    (child, clients)
}

#[test]
fn echo_across_processes_all_sizes() {
    let dir = TempDir::new("ipc-echo");
    let cfg = ChannelConfig {
        slots: 4,
        slot_capacity: 64 * 1024,
    };
    let (mut child, ends) = server_with_clients(&dir, "echo-server", &cfg, 1);
    let mut client = Client::open(ends.into_iter().next().unwrap()).unwrap();
    for size in [0usize, 1, 63, 64, 65, 4096, 64 * 1024] {
        let req: Vec<u8> = (0..size).map(|i| (i * 7 + size) as u8).collect();
        assert_eq!(client.call(&req).unwrap(), req, "size {size}");
    }
    for i in 0..10_000u32 {
        assert_eq!(client.call(&i.to_le_bytes()).unwrap(), i.to_le_bytes());
    }
    drop(client);
    let st = child
        .wait_timeout(Duration::from_secs(10))
        .expect("server exits when its only client leaves");
    assert!(st.success(), "{st:?}");
}

#[test]
fn server_reads_every_byte_of_a_large_request_in_place() {
    let dir = TempDir::new("ipc-sum");
    let cfg = ChannelConfig {
        slots: 2,
        slot_capacity: 1 << 20,
    };
    let (_child, ends) = server_with_clients(&dir, "sum-server", &cfg, 1);
    let mut client = Client::open(ends.into_iter().next().unwrap()).unwrap();
    let req: Vec<u8> = (0..1 << 20).map(|i: u32| (i % 251) as u8).collect();
    let want: u64 = req.iter().map(|&b| b as u64).sum();
    let got = client.call(&req).unwrap();
    assert_eq!(u64::from_le_bytes(got.try_into().unwrap()), want);
}

#[test]
fn killed_server_is_peer_gone_not_a_hang() {
    let dir = TempDir::new("ipc-kill");
    let (mut child, ends) = server_with_clients(&dir, "echo-server", &ChannelConfig::default(), 1);
    let mut client = Client::open(ends.into_iter().next().unwrap()).unwrap();
    assert_eq!(client.call(b"before").unwrap(), b"before");
    child.kill();
    let err = client.call(b"after").unwrap_err();
    assert!(matches!(err, ChannelError::PeerGone), "{err}");
}

#[test]
fn garbage_writing_client_does_not_disturb_other_clients() {
    let dir = TempDir::new("ipc-evil-client");
    let cfg = ChannelConfig::default();
    let (mut server, mut ends) = server_with_clients(&dir, "echo-server", &cfg, 2);
    let good_end = ends.pop().unwrap();
    let evil_end = ends.pop().unwrap();
    let (mut evil, evil_sock) = spawn_peer(&dir, PEER, &["evil-client"]);
    send_fds(&evil_sock, b'C', &evil_end.fds());
    drop(evil_end);
    let mut good = Client::open(good_end).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..20_000u32 {
        let got = good.call_deadline(&i.to_le_bytes(), deadline);
        assert_eq!(got.unwrap(), i.to_le_bytes(), "call {i}");
    }
    evil.kill();
    assert_eq!(good.call(b"still here").unwrap(), b"still here");
    assert!(
        server.0.try_wait().unwrap().is_none(),
        "server must survive a hostile client"
    );
}

#[test]
fn garbage_writing_server_yields_errors_never_a_crash_or_hang() {
    let dir = TempDir::new("ipc-evil-server");
    let (c, s) = channel_pair(&ChannelConfig {
        slots: 4,
        slot_capacity: 256,
    })
    .unwrap();
    // The "server" is a process that only scribbles over the whole segment.
    let (_scribbler, sock) = spawn_peer(&dir, PEER, &["scribbler"]);
    send_fds(&sock, b'M', &[s.fds()[0]]);
    // Keep the doorbell open so the client cannot tell the peer is hostile
    // by its absence; it must notice from what it reads.
    let (_memfd, _server_sock) = s.into_fds();
    let mut client = Client::open(c).unwrap();
    let mut outcomes = [0usize; 2];
    for _ in 0..2_000 {
        match client.call_deadline(b"hello", Instant::now() + Duration::from_millis(2)) {
            Ok(_) => outcomes[0] += 1,
            Err(ChannelError::Corrupt(_) | ChannelError::TimedOut | ChannelError::Remote(_)) => {
                outcomes[1] += 1
            }
            Err(e) => panic!("unexpected error kind: {e}"),
        }
    }
    assert!(
        outcomes[1] > 0,
        "a scribbled channel must produce errors: {outcomes:?}"
    );
}

fn typed_client(end: shm_ipc::channel::ClientEnd) -> ServiceClient<Echo, Echo> {
    let (memfd, sock) = end.into_fds();
    ServiceClient::open(ChannelFds { memfd, sock }).unwrap()
}

#[test]
fn typed_calls_across_processes_all_sizes_and_one_too_large() {
    let dir = TempDir::new("ipc-typed");
    let cfg = ChannelConfig {
        slots: 4,
        slot_capacity: 64 * 1024,
    };
    let (mut child, ends) = server_with_clients(&dir, "typed-echo-server", &cfg, 1);
    let mut client = typed_client(ends.into_iter().next().unwrap());
    for size in [0usize, 1, 63, 64, 65, 4096, 60_000] {
        let req = Echo {
            n: size as u64,
            bytes: (0..size).map(|i| (i * 7 + size) as u8).collect(),
        };
        // Read in place, in the client's buffer.
        let reply = client.call(&req, None).unwrap();
        assert_eq!(reply.n, size as u64, "size {size}");
        assert_eq!(reply.bytes.as_slice(), &req.bytes[..], "size {size}");
        assert_eq!(reply.deserialize().unwrap(), req);
    }
    // Larger than a slot: refused with its size, nothing sent; the channel
    // goes on.
    let big = Echo {
        n: 0,
        bytes: vec![1; 70_000],
    };
    let e = client.call(&big, None).unwrap_err();
    assert!(
        matches!(e, ServiceError::TooLarge { needed, capacity: 65536 } if needed > 70_000),
        "{e:?}"
    );
    let req = Echo {
        n: 9,
        bytes: b"after".to_vec(),
    };
    assert_eq!(client.call_owned(&req, None).unwrap(), req);
    drop(client);
    let st = child
        .wait_timeout(Duration::from_secs(10))
        .expect("server exits when its only client leaves");
    assert!(st.success(), "{st:?}");
}

/// What a typed client got from a garbage-writing server.
#[derive(Default)]
struct Scribbled {
    valid: usize,
    errors: usize,
    corrupt: usize,
}

impl Scribbled {
    /// Records one call's outcome; false once the client has no channel
    /// left (a corrupt channel is dropped, and a client on fixed ends then
    /// has none).
    fn record(&mut self, outcome: Result<&ArchivedEcho, &ServiceError>) -> bool {
        match outcome {
            // Whatever the scribbler left there passed validation: a
            // well-formed archive, read (every byte) from the client's
            // private copy.
            Ok(reply) => {
                assert!(reply.bytes.len() <= 256);
                std::hint::black_box(reply.bytes.iter().map(|&b| u64::from(b)).sum::<u64>());
                self.valid += 1;
            }
            Err(ServiceError::Channel(ChannelError::Corrupt(_))) => {
                self.errors += 1;
                self.corrupt += 1;
            }
            Err(ServiceError::Codec(_))
            | Err(ServiceError::Channel(ChannelError::TimedOut | ChannelError::Remote(_))) => {
                self.errors += 1
            }
            Err(ServiceError::Channel(ChannelError::PeerGone)) if self.corrupt > 0 => return false,
            Err(e) => panic!("unexpected error kind: {e:?}"),
        }
        true
    }

    fn check(&self) {
        assert!(
            self.errors > 0,
            "a scribbled channel must produce errors ({} valid replies)",
            self.valid
        );
    }
}

/// A channel whose server end goes to the scribbler peer, once `open` has
/// opened (checked the header of) the client end, before it may write.
fn scribbled_channel<C>(
    dir: &TempDir,
    open: impl FnOnce(ChannelFds) -> C,
) -> (C, ember_tests::ChildGuard, OwnedFds) {
    let (c, s) = channel_pair(&ChannelConfig {
        slots: 4,
        slot_capacity: 256,
    })
    .unwrap();
    let (memfd, sock) = c.into_fds();
    let client = open(ChannelFds { memfd, sock });
    let (scribbler, peer) = spawn_peer(dir, PEER, &["scribbler"]);
    send_fds(&peer, b'M', &[s.fds()[0]]);
    (client, scribbler, s.into_fds())
}

type OwnedFds = (std::os::fd::OwnedFd, std::os::fd::OwnedFd);

fn echo_16() -> Echo {
    Echo {
        n: 1,
        bytes: vec![2; 16],
    }
}

#[test]
fn an_async_typed_client_of_a_garbage_writing_server_gets_errors_or_valid_replies() {
    let dir = TempDir::new("ipc-typed-evil-server-async");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut seen = Scribbled::default();
    rt.block_on(async {
        let (client, _scribbler, _server_end) = scribbled_channel(&dir, |fds| {
            AsyncServiceClient::<Echo, Echo>::open(fds).unwrap()
        });
        let req = echo_16();
        for _ in 0..2_000 {
            let deadline = Some(Instant::now() + Duration::from_millis(2));
            let reply = client.call(&req, deadline).await;
            if !seen.record(reply.as_deref()) {
                break;
            }
        }
    });
    seen.check();
}

#[test]
fn a_typed_client_of_a_garbage_writing_server_gets_errors_or_valid_replies() {
    let dir = TempDir::new("ipc-typed-evil-server");
    let (mut client, _scribbler, _server_end) =
        scribbled_channel(&dir, |fds| ServiceClient::<Echo, Echo>::open(fds).unwrap());
    let req = echo_16();
    let mut seen = Scribbled::default();
    for _ in 0..2_000 {
        let reply = client.call(&req, Some(Instant::now() + Duration::from_millis(2)));
        if !seen.record(reply.as_deref()) {
            break;
        }
    }
    seen.check();
}
