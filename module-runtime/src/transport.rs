//! The control transport, one for every control link (emberd ↔ zygote,
//! emberd ↔ worker, the fork path's hand-off): a connected
//! `SOCK_SEQPACKET` Unix socket, one [`codec`](crate::protocol::codec)
//! frame per packet, descriptors attached with `SCM_RIGHTS`
//! (`shm_ipc::fdpass`, close-on-exec on arrival).
//!
//! A message with more descriptors than one packet carries
//! ([`FDS_PER_PACKET`]) sends the rest right after it in continuation
//! packets ([`more_fds_frame`]); [`Link::try_recv`] reassembles them by the
//! count the message declares ([`Message::fd_count`]).
//!
//! Each [`Link`] keeps one receive buffer for its life: a packet's length
//! is peeked first (`MSG_PEEK | MSG_TRUNC`, nothing taken), the buffer
//! grows to it if it must (never past [`MAX_FRAME`]), and the packet is
//! read into it. Nothing is allocated or zero-filled per packet.
//!
//! Receiving never blocks in the socket call: [`Link::try_recv`] takes what
//! is queued (a message, or part of one, kept until its continuation
//! packets arrive), so the same code serves blocking callers
//! ([`Link::recv_timeout`], which waits with `poll`) and async ones (the
//! supervisor waits for readiness on tokio's reactor, then calls
//! `try_recv`).
//!
//! ```
//! use module_runtime::protocol::{FromWorker, ParentChannel, WorkerChannel};
//! use module_runtime::transport::socket_pair;
//!
//! let (a, b) = socket_pair()?;
//! let (parent, mut worker) = (ParentChannel::new(a), WorkerChannel::new(b));
//! worker.send(
//!     &FromWorker::Idle { pid: 1, abi_version: 1, sdk_version: "0.1.0".into() },
//!     &[],
//! )?;
//! # drop(worker);
//! let mut parent = parent;
//! let (msg, fds) = parent.recv_timeout(Some(std::time::Duration::from_secs(1)))?;
//! assert!(matches!(msg, FromWorker::Idle { pid: 1, .. }) && fds.is_empty());
//! # Ok::<(), module_runtime::transport::LinkError>(())
//! ```

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use shm_ipc::fdpass::{self, FdSpace};

pub use crate::protocol::codec::more_fds_frame;
use crate::protocol::codec::{is_more_fds, Message, MAX_FRAME};
use crate::protocol::DecodeError;

/// Most descriptors one packet carries (what a receiver makes room for);
/// a message with more sends the rest in continuation packets.
pub const FDS_PER_PACKET: usize = fdpass::MAX_FDS;

/// How long a blocking receiver waits for the continuation packets of a
/// message (the peer sends them right after it).
pub const CONTINUATION_WAIT: Duration = Duration::from_secs(5);

/// Errors sending or receiving a control message.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The socket call failed.
    #[error("control socket i/o failed")]
    Io(#[source] std::io::Error),
    /// The peer closed the socket.
    #[error("control socket closed by peer")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out waiting for a control message")]
    Timeout,
    /// The frame did not decode.
    #[error("malformed control message")]
    Decode(#[source] DecodeError),
    /// A message's descriptors did not all arrive (or more did).
    #[error("a control message lists {expected} descriptors but {arrived} arrived")]
    Descriptors {
        /// What the message declares.
        expected: usize,
        /// What arrived with it and its continuation packets.
        arrived: usize,
    },
}

impl LinkError {
    fn from_io(e: std::io::Error) -> Self {
        match e.raw_os_error() {
            Some(libc::EPIPE | libc::ECONNRESET) => LinkError::Closed,
            _ => LinkError::Io(e),
        }
    }

    /// A non-blocking socket had no room (send) or nothing queued.
    pub fn is_would_block(&self) -> bool {
        matches!(self, LinkError::Io(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// Creates a connected `SOCK_SEQPACKET` pair (close-on-exec).
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd), LinkError> {
    fdpass::seqpacket_pair().map_err(LinkError::Io)
}

/// The packets one message travels in: its frame with the first
/// [`FDS_PER_PACKET`] descriptors, then continuation frames with the rest,
/// in order.
pub fn packets<'a, 'f>(
    frame: Vec<u8>,
    fds: &'a [BorrowedFd<'f>],
) -> impl Iterator<Item = (Vec<u8>, &'a [BorrowedFd<'f>])> {
    let first = fds.len().min(FDS_PER_PACKET);
    std::iter::once((frame, &fds[..first])).chain(
        fds[first..]
            .chunks(FDS_PER_PACKET)
            .map(|c| (more_fds_frame(), c)),
    )
}

/// Sends one packet (a frame and at most [`FDS_PER_PACKET`] descriptors).
/// A closed peer is [`LinkError::Closed`]; on a non-blocking socket with a
/// full queue, an error for which [`LinkError::is_would_block`] holds, and
/// nothing was sent.
pub fn send_packet(
    sock: BorrowedFd<'_>,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), LinkError> {
    loop {
        match fdpass::send_with_fds(sock, frame, fds) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(LinkError::from_io(e)),
            Ok(_) => return Ok(()),
        }
    }
}

/// Waits until `fd` is readable (or hung up). `false` on timeout.
pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool, LinkError> {
    wait_readable_until(fd, Some(Instant::now() + timeout))
}

/// Waits until `fd` is readable (or hung up), at most until `deadline`
/// (`None`: forever). `false` once the deadline has passed.
fn wait_readable_until(fd: BorrowedFd<'_>, deadline: Option<Instant>) -> Result<bool, LinkError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    loop {
        let timeout = match deadline {
            None => PollTimeout::NONE,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Rounded up: waking before the deadline would only loop.
                let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
                PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
            }
        };
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) if deadline.is_some_and(|d| Instant::now() >= d) => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(LinkError::Io(e.into())),
        }
    }
}

/// A message whose continuation packets have not all arrived.
#[derive(Debug)]
struct Partial<In> {
    msg: In,
    fds: Vec<OwnedFd>,
    expected: usize,
    since: Instant,
}

/// One end of a control link, sending `Out` and receiving `In`.
#[derive(Debug)]
pub struct Link<Out, In> {
    sock: OwnedFd,
    /// The receive buffer, reused for every packet; as long as the longest
    /// packet received so far.
    buf: Vec<u8>,
    space: FdSpace,
    partial: Option<Partial<In>>,
    _marker: std::marker::PhantomData<fn(Out)>,
}

impl<Out, In> Link<Out, In> {
    /// Wraps a connected `SOCK_SEQPACKET` socket (blocking or not). `Out`
    /// or `In` may be `()` for an end that only receives or only sends.
    pub fn new(sock: OwnedFd) -> Self {
        Self {
            sock,
            buf: Vec::new(),
            space: FdSpace::new(),
            partial: None,
            _marker: std::marker::PhantomData,
        }
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Gives the socket back (a message half received is dropped).
    pub fn into_inner(self) -> OwnedFd {
        self.sock
    }
}

impl<Out: Message, In> Link<Out, In> {
    /// Sends one message with `fds` attached (in several packets if there
    /// are more than [`FDS_PER_PACKET`]). Blocks while the socket's queue
    /// is full, unless the socket is non-blocking (then see
    /// [`send_packet`]).
    pub fn send(&self, msg: &Out, fds: &[BorrowedFd<'_>]) -> Result<(), LinkError> {
        for (frame, fds) in packets(msg.encode(), fds) {
            send_packet(self.sock.as_fd(), &frame, fds)?;
        }
        Ok(())
    }
}

impl<Out, In: Message> Link<Out, In> {
    /// Receives one message, blocking.
    pub fn recv(&mut self) -> Result<(In, Vec<OwnedFd>), LinkError> {
        self.recv_timeout(None)
    }

    /// Receives one message, waiting at most `timeout` (`None`: forever).
    /// A message whose continuation packets do not follow within
    /// [`CONTINUATION_WAIT`] is a [`LinkError::Descriptors`].
    pub fn recv_timeout(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<(In, Vec<OwnedFd>), LinkError> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            if let Some(m) = self.try_recv()? {
                return Ok(m);
            }
            let Some(since) = self.partial.as_ref().map(|p| p.since) else {
                if !wait_readable_until(self.sock.as_fd(), deadline)? {
                    return Err(LinkError::Timeout);
                }
                continue;
            };
            let cut = since + CONTINUATION_WAIT;
            let until = deadline.map_or(cut, |d| d.min(cut));
            if !wait_readable_until(self.sock.as_fd(), Some(until))? {
                if Instant::now() < cut {
                    // The caller's deadline; the message may still complete.
                    return Err(LinkError::Timeout);
                }
                let p = self.partial.take().expect("checked above");
                return Err(LinkError::Descriptors {
                    expected: p.expected,
                    arrived: p.fds.len(),
                });
            }
        }
    }

    /// Takes the next message if it is here whole, without blocking:
    /// `Ok(None)` when nothing (or only part of a message) is queued. Call
    /// again once the socket is readable. Cancel-safe: a packet is either
    /// taken whole or left in the socket, and a message waiting for its
    /// continuation packets is kept in the link.
    pub fn try_recv(&mut self) -> Result<Option<(In, Vec<OwnedFd>)>, LinkError> {
        loop {
            let len = match fdpass::peek_len(self.sock.as_fd()) {
                Ok(None) => return Ok(None),
                Ok(Some(0)) => return Err(LinkError::Closed),
                Ok(Some(n)) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(LinkError::from_io(e)),
            };
            if len > MAX_FRAME {
                // Take it off the socket (its descriptors are closed) and
                // say what it was.
                self.partial = None;
                let _ =
                    fdpass::recv_packet(self.sock.as_fd(), &mut [0u8; 1], &mut self.space, true);
                return Err(LinkError::Decode(DecodeError::TooLarge(len)));
            }
            if self.buf.len() < len {
                self.buf.resize(len, 0);
            }
            let p = match fdpass::recv_packet(
                self.sock.as_fd(),
                &mut self.buf[..len],
                &mut self.space,
                true,
            ) {
                Ok(p) => p,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                Err(e) => {
                    self.partial = None;
                    return Err(LinkError::from_io(e));
                }
            };
            let bytes = &self.buf[..p.len];
            let (msg, fds, expected, since) = match self.partial.take() {
                None => {
                    let msg = In::decode(bytes).map_err(LinkError::Decode)?;
                    let expected = msg.fd_count();
                    (msg, p.fds, expected, Instant::now())
                }
                Some(mut part) => {
                    if p.fds.is_empty() || !is_more_fds(bytes) {
                        // Another message instead of the continuation.
                        return Err(LinkError::Descriptors {
                            expected: part.expected,
                            arrived: part.fds.len(),
                        });
                    }
                    part.fds.extend(p.fds);
                    (part.msg, part.fds, part.expected, part.since)
                }
            };
            match fds.len() {
                n if n == expected => return Ok(Some((msg, fds))),
                n if n > expected => {
                    return Err(LinkError::Descriptors {
                        expected,
                        arrived: n,
                    })
                }
                _ => {
                    self.partial = Some(Partial {
                        msg,
                        fds,
                        expected,
                        since,
                    })
                }
            }
        }
    }

    /// Where the receive buffer is and how long it is (for tests of its
    /// reuse).
    #[cfg(test)]
    fn buffer(&self) -> (*const u8, usize) {
        (self.buf.as_ptr(), self.buf.len())
    }
}

impl<Out, In> AsFd for Link<Out, In> {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

impl<Out, In> AsRawFd for Link<Out, In> {
    fn as_raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::abi::GrantKind;
    use crate::protocol::{
        FromWorker, Grant, LaunchOrder, ParentChannel, State, ToWorker, WorkerChannel,
    };

    fn launch(grants: usize) -> ToWorker {
        ToWorker::Launch(LaunchOrder {
            artifact: "/x/libhello.so".into(),
            manifest: "name = \"hello\"".into(),
            replica: 0,
            memory_enforced: false,
            grants: (0..grants)
                .map(|i| Grant {
                    kind: GrantKind::Listener,
                    name: format!("l{i}"),
                })
                .collect(),
            sandbox: None,
        })
    }

    fn pair() -> (ParentChannel, WorkerChannel) {
        let (a, b) = socket_pair().unwrap();
        (ParentChannel::new(a), WorkerChannel::new(b))
    }

    #[test]
    fn carries_messages_and_descriptors() {
        let (mut parent, mut worker) = pair();
        let (r, w) = nix::unistd::pipe().unwrap();
        parent
            .send(&launch(3), &[r.as_fd(), w.as_fd(), r.as_fd()])
            .unwrap();
        let (msg, fds) = worker.recv_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(msg, launch(3));
        assert_eq!(fds.len(), 3);
        // The pipe's write end arrived as a working descriptor.
        nix::unistd::write(&fds[1], b"z").unwrap();
        let mut one = [0u8; 1];
        assert_eq!(nix::unistd::read(r.as_fd(), &mut one).unwrap(), 1);
        assert!(matches!(
            parent.recv_timeout(Some(Duration::from_millis(10))),
            Err(LinkError::Timeout)
        ));
        assert!(matches!(parent.try_recv(), Ok(None)));
        drop(worker);
        assert!(matches!(parent.recv(), Err(LinkError::Closed)));
        assert!(matches!(
            parent.send(
                &ToWorker::Stop {
                    deadline: Duration::ZERO
                },
                &[]
            ),
            Err(LinkError::Closed)
        ));
    }

    #[test]
    fn the_receive_buffer_is_reused_and_grows_only_to_the_longest_packet() {
        let (parent, mut worker) = pair();
        let stop = ToWorker::Stop {
            deadline: Duration::from_secs(1),
        };
        parent.send(&stop, &[]).unwrap();
        worker.recv().unwrap();
        let (at, len) = worker.buffer();
        assert_eq!(len, stop.encode().len(), "sized to the packet, not 1 MiB");
        for _ in 0..100 {
            parent.send(&stop, &[]).unwrap();
            assert_eq!(worker.recv().unwrap().0, stop);
            assert_eq!(worker.buffer(), (at, len), "no new buffer per packet");
        }
        // A longer message grows it once; shorter ones reuse it after.
        let big = ToWorker::Launch(LaunchOrder {
            manifest: "#".repeat(100_000),
            ..match launch(1) {
                ToWorker::Launch(o) => o,
                _ => unreachable!(),
            }
        });
        let big_len = big.encode().len();
        let (r, _w) = nix::unistd::pipe().unwrap();
        parent.send(&big, &[r.as_fd()]).unwrap();
        let (got, fds) = worker.recv().unwrap();
        assert_eq!((got, fds.len()), (big, 1));
        let (at, len) = worker.buffer();
        assert_eq!(len, big_len);
        parent.send(&stop, &[]).unwrap();
        worker.recv().unwrap();
        assert_eq!(worker.buffer(), (at, len));
    }

    #[test]
    fn more_descriptors_than_one_packet_carries_arrive_in_order() {
        let (parent, mut worker) = pair();
        // 70 pipes: each descriptor is told apart by what it reads.
        let pipes: Vec<_> = (0..70).map(|_| nix::unistd::pipe().unwrap()).collect();
        for (i, (_, w)) in pipes.iter().enumerate() {
            nix::unistd::write(w, &[i as u8]).unwrap();
        }
        let msg = ToWorker::Attach(
            (0..35)
                .map(|i| Grant {
                    kind: GrantKind::Import,
                    name: format!("s{i}"),
                })
                .collect(),
        );
        assert_eq!(msg.fd_count(), 70);
        const { assert!(70 > 2 * FDS_PER_PACKET) };
        let fds: Vec<_> = pipes.iter().map(|(r, _)| r.as_fd()).collect();
        parent.send(&msg, &fds).unwrap();
        let (got, fds) = worker.recv_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), 70);
        for (i, fd) in fds.iter().enumerate() {
            let mut b = [0u8; 1];
            nix::unistd::read(fd.as_fd(), &mut b).unwrap();
            assert_eq!(b[0], i as u8, "descriptor {i} out of order");
        }
    }

    #[test]
    fn a_message_split_across_reads_is_kept_until_it_is_whole() {
        let (parent, mut worker) = pair();
        let (r, _w) = nix::unistd::pipe().unwrap();
        let msg = launch(40);
        let frame = msg.encode();
        send_packet(parent.fd(), &frame, &[r.as_fd(); FDS_PER_PACKET]).unwrap();
        // The first packet alone is not a message yet.
        assert!(matches!(worker.try_recv(), Ok(None)));
        send_packet(parent.fd(), &more_fds_frame(), &[r.as_fd(); 8]).unwrap();
        let (got, fds) = worker.try_recv().unwrap().expect("whole now");
        assert_eq!((got, fds.len()), (msg, 40));
    }

    #[test]
    fn a_short_descriptor_list_is_an_error_naming_the_counts() {
        let (parent, mut worker) = pair();
        let (r, _w) = nix::unistd::pipe().unwrap();
        let msg = launch(50);
        // A peer that sends the first packet only, then another message.
        send_packet(parent.fd(), &msg.encode(), &[r.as_fd(); FDS_PER_PACKET]).unwrap();
        parent
            .send(
                &ToWorker::Stop {
                    deadline: Duration::ZERO,
                },
                &[],
            )
            .unwrap();
        match worker.recv() {
            Err(e @ LinkError::Descriptors { expected, arrived }) => {
                assert_eq!((expected, arrived), (50, FDS_PER_PACKET));
                assert_eq!(
                    e.to_string(),
                    "a control message lists 50 descriptors but 32 arrived"
                );
            }
            other => panic!("{other:?}"),
        }
        // Too many descriptors for what the message declares.
        send_packet(parent.fd(), &launch(1).encode(), &[r.as_fd(), r.as_fd()]).unwrap();
        assert!(matches!(
            worker.recv(),
            Err(LinkError::Descriptors {
                expected: 1,
                arrived: 2
            })
        ));
        // The link goes on after either.
        parent.send(&launch(0), &[]).unwrap();
        assert_eq!(worker.recv().unwrap().0, launch(0));
    }

    #[test]
    fn garbage_and_oversized_packets_are_typed_errors_and_the_link_goes_on() {
        let (parent, mut worker) = pair();
        let (r, _w) = nix::unistd::pipe().unwrap();
        send_packet(parent.fd(), b"not a frame at all", &[r.as_fd()]).unwrap();
        match worker.recv() {
            Err(LinkError::Decode(DecodeError::BadMagic { .. })) => {}
            other => panic!("{other:?}"),
        }
        // Larger than any frame may be: the kernel refuses to send it
        // (its send buffer is smaller), or the receiver takes it off the
        // socket and refuses it; either way it never reaches a decoder.
        let _ = nix::sys::socket::setsockopt(
            &parent.fd(),
            nix::sys::socket::sockopt::SndBuf,
            &(4 * MAX_FRAME),
        );
        let huge = vec![0u8; MAX_FRAME + 1];
        match send_packet(parent.fd(), &huge, &[r.as_fd()]) {
            Err(LinkError::Io(e)) => assert_eq!(e.raw_os_error(), Some(libc::EMSGSIZE)),
            Err(e) => panic!("{e:?}"),
            Ok(()) => match worker.recv() {
                Err(LinkError::Decode(DecodeError::TooLarge(n))) => assert_eq!(n, MAX_FRAME + 1),
                other => panic!("{other:?}"),
            },
        }
        // A message for another link: refused by its kind.
        let idle = FromWorker::Transition {
            state: State::Ready,
            detail: String::new(),
        }
        .encode();
        send_packet(parent.fd(), &idle, &[]).unwrap();
        match worker.recv() {
            Err(e @ LinkError::Decode(DecodeError::UnknownKind { .. })) => {
                assert_eq!(
                    crate::sdk::error_chain(&e),
                    "malformed control message: unknown frame kind 101 for a parent → worker message"
                );
            }
            other => panic!("{other:?}"),
        }
        parent.send(&launch(0), &[]).unwrap();
        assert_eq!(worker.recv().unwrap().0, launch(0));
    }
}
