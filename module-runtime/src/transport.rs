//! The transport of control messages: a `SOCK_SEQPACKET` Unix socket, one
//! frame per packet, descriptors attached with `SCM_RIGHTS`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Duration;

use crate::protocol::codec::{kind, open_frame, Enc, Message, MAX_FRAME};
use crate::protocol::DecodeError;

/// Most descriptors one packet carries (what a receiver makes room for);
/// a message with more sends the rest in continuation packets.
pub const FDS_PER_PACKET: usize = shm_ipc::fdpass::MAX_FDS;

/// A continuation packet's frame: it carries the next descriptors of the
/// message before it, and nothing else.
pub fn more_fds_frame() -> Vec<u8> {
    Enc::new(kind::MORE_FDS).finish()
}

/// The packets one message travels in: its frame with the first
/// [`FDS_PER_PACKET`] descriptors, then continuation frames with the rest,
/// in order. The receiver ([`Channel::recv`]) reassembles them by the count
/// the message declares.
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

/// Errors sending or receiving a frame.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
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

/// Creates a connected `SOCK_SEQPACKET` pair (close-on-exec) for a parent and
/// a worker.
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd), ChannelError> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| ChannelError::Io(e.into()))
}

/// One end of a control socket, sending `Out` and receiving `In`.
#[derive(Debug)]
pub struct Channel<Out, In> {
    sock: OwnedFd,
    _marker: std::marker::PhantomData<fn(Out) -> In>,
}

/// The parent's end.
impl<Out: Message, In: Message> Channel<Out, In> {
    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn new(sock: OwnedFd) -> Self {
        Self {
            sock,
            _marker: std::marker::PhantomData,
        }
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Gives the socket back.
    pub fn into_inner(self) -> OwnedFd {
        self.sock
    }

    /// Sends one message with `fds` attached (in several packets if there
    /// are more than [`FDS_PER_PACKET`]).
    pub fn send(&self, msg: &Out, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        for (frame, fds) in packets(msg.encode(), fds) {
            send_frame(self.sock.as_fd(), &frame, fds)?;
        }
        Ok(())
    }

    /// Receives one message, blocking.
    pub fn recv(&self) -> Result<(In, Vec<OwnedFd>), ChannelError> {
        self.recv_timeout(None)
    }

    /// Receives one message, waiting at most `timeout` (`None`: forever).
    pub fn recv_timeout(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(In, Vec<OwnedFd>), ChannelError> {
        if let Some(t) = timeout {
            if !wait_readable(self.sock.as_fd(), t)? {
                return Err(ChannelError::Timeout);
            }
        }
        let mut buf = vec![0u8; MAX_FRAME];
        let (n, mut fds) = self.recv_packet(&mut buf)?;
        let msg = In::decode(&buf[..n]).map_err(ChannelError::Decode)?;
        // The rest of its descriptors follow in continuation packets, sent
        // back to back by the peer.
        let expected = msg.fd_count();
        while fds.len() < expected {
            let short = ChannelError::Descriptors {
                expected,
                arrived: fds.len(),
            };
            if !wait_readable(self.sock.as_fd(), CONTINUATION_WAIT)? {
                return Err(short);
            }
            let (n, more) = self.recv_packet(&mut buf)?;
            match open_frame(&buf[..n]) {
                Ok((kind::MORE_FDS, [])) if !more.is_empty() => fds.extend(more),
                _ => return Err(short),
            }
        }
        if fds.len() > expected {
            return Err(ChannelError::Descriptors {
                expected,
                arrived: fds.len(),
            });
        }
        Ok((msg, fds))
    }

    /// One packet and its descriptors; a truncated descriptor list (more
    /// than [`FDS_PER_PACKET`] in one packet) is an error.
    fn recv_packet(&self, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), ChannelError> {
        let (n, fds) = loop {
            match shm_ipc::fdpass::recv_with_fds(self.sock.as_fd(), buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.map_err(ChannelError::Io)?,
            }
        };
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        Ok((n, fds))
    }
}

/// How long a receiver waits for the continuation packets of a message
/// (the peer sends them right after it).
const CONTINUATION_WAIT: Duration = Duration::from_secs(5);

/// Sends one raw frame. Used by the crash handler path too, which
/// pre-encodes its frames.
pub(crate) fn send_frame(
    sock: BorrowedFd<'_>,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ChannelError> {
    loop {
        match shm_ipc::fdpass::send_with_fds(sock, frame, fds) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.raw_os_error() == Some(libc::EPIPE)
                    || e.raw_os_error() == Some(libc::ECONNRESET) =>
            {
                return Err(ChannelError::Closed)
            }
            Err(e) => return Err(ChannelError::Io(e)),
            Ok(_) => return Ok(()),
        }
    }
}

/// Waits until `fd` is readable (or hung up). `false` on timeout.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool, ChannelError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) if left.is_zero() => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ChannelError::Io(e.into())),
        }
    }
}
