//! The wake-up path: one end of a Unix stream socketpair per endpoint.
//!
//! A parked side polls its socket; the other side writes one byte to wake it.
//! The same socket tells either side that its peer is gone (end of stream),
//! which a futex could not, and it works with `poll` and tokio's `AsyncFd`.
//! Bytes are only written while the peer's `parked` flag is set, so the fast
//! path makes no system call.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{recv, send, MsgFlags};

/// Result of draining a doorbell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drained {
    /// The peer is still there.
    Alive,
    /// End of stream: the peer closed its end (or died).
    PeerGone,
}

/// Writes one wake-up byte. A full socket buffer already holds wake-ups, and a
/// gone peer is noticed by the next wait, so both are ignored here.
pub(crate) fn ring(sock: BorrowedFd<'_>) {
    let _ = send(
        sock.as_raw_fd(),
        &[1],
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
    );
}

/// Reads every pending wake-up byte without blocking.
pub(crate) fn drain(sock: BorrowedFd<'_>) -> std::io::Result<Drained> {
    read_wakeups(sock, MsgFlags::MSG_DONTWAIT)
}

/// Blocks until at least one wake-up byte (or end of stream) arrives, then
/// drains the rest.
pub(crate) fn wait_and_drain(sock: BorrowedFd<'_>) -> std::io::Result<Drained> {
    read_wakeups(sock, MsgFlags::empty())
}

fn read_wakeups(sock: BorrowedFd<'_>, first: MsgFlags) -> std::io::Result<Drained> {
    let mut buf = [0u8; 64];
    let mut flags = first;
    loop {
        match recv(sock.as_raw_fd(), &mut buf, flags) {
            Ok(0) => return Ok(Drained::PeerGone),
            // A short read took everything that was queued.
            Ok(n) if n < buf.len() => return Ok(Drained::Alive),
            Ok(_) => flags = MsgFlags::MSG_DONTWAIT,
            Err(Errno::EAGAIN) => return Ok(Drained::Alive),
            Err(Errno::EINTR) => continue,
            Err(Errno::ECONNRESET) => return Ok(Drained::PeerGone),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Milliseconds until `deadline`, rounded up, for `poll`.
pub(crate) fn poll_timeout(deadline: Option<Instant>) -> PollTimeout {
    match deadline {
        None => PollTimeout::NONE,
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX)
        }
    }
}

/// Blocks until some socket in `socks` is readable or `deadline` passes.
/// Returns which sockets are readable (or hung up); all false on timeout.
pub(crate) fn wait_any(
    socks: &[BorrowedFd<'_>],
    deadline: Option<Instant>,
) -> std::io::Result<Vec<bool>> {
    loop {
        let mut fds: Vec<PollFd<'_>> = socks
            .iter()
            .map(|s| PollFd::new(*s, PollFlags::POLLIN))
            .collect();
        match poll(&mut fds, poll_timeout(deadline)) {
            Ok(_) => {
                return Ok(fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect());
            }
            Err(Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Blocks until `sock` is readable or `deadline` passes; true if readable.
pub(crate) fn wait_one(sock: &OwnedFd, deadline: Option<Instant>) -> std::io::Result<bool> {
    Ok(wait_any(&[sock.as_fd()], deadline)?[0])
}
