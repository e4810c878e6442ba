//! Passing descriptors over Unix sockets (`SCM_RIGHTS`): the one place the
//! workspace calls `sendmsg`/`recvmsg` with descriptors. Everything that
//! moves descriptors between processes (shm-ipc's channel ends and shared
//! data, module-runtime's control transport between emberd, the zygote and
//! the workers) goes through [`send_with_fds`] and [`recv_packet`].
//!
//! Received descriptors are always close-on-exec (`MSG_CMSG_CLOEXEC`) and
//! owned ([`OwnedFd`]) from the moment they exist: a packet that cannot be
//! taken whole (data or descriptors cut off) is an error, and the
//! descriptors that did arrive are closed, never leaked.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// A connected pair of close-on-exec Unix stream sockets.
pub fn stream_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// A connected pair of close-on-exec Unix `SOCK_SEQPACKET` sockets: message
/// boundaries kept, one packet per `sendmsg`.
pub fn seqpacket_pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Most descriptors one message may carry.
pub const MAX_FDS: usize = 32;

/// Sends `data` (at least one byte) with `fds` attached. Never raises
/// `SIGPIPE` (a closed peer is `EPIPE`). On a non-blocking socket a full
/// queue is `WouldBlock`, and nothing was sent.
pub fn send_with_fds(
    sock: BorrowedFd<'_>,
    data: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<usize> {
    if data.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "send_with_fds needs at least one data byte",
        ));
    }
    if fds.len() > MAX_FDS {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} descriptors in one message (at most {MAX_FDS})",
                fds.len()
            ),
        ));
    }
    let mut raw = [0 as RawFd; MAX_FDS];
    for (r, f) in raw.iter_mut().zip(fds) {
        *r = f.as_raw_fd();
    }
    let cmsg = [ControlMessage::ScmRights(&raw[..fds.len()])];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    let iov = [IoSlice::new(data)];
    Ok(sendmsg::<()>(
        sock.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?)
}

/// Room for the descriptors of one received packet ([`MAX_FDS`]), made
/// once and reused by every [`recv_packet`].
#[derive(Debug)]
pub struct FdSpace(Vec<u8>);

impl FdSpace {
    /// Room for [`MAX_FDS`] descriptors.
    pub fn new() -> Self {
        Self(nix::cmsg_space!([RawFd; MAX_FDS]))
    }
}

impl Default for FdSpace {
    fn default() -> Self {
        Self::new()
    }
}

/// One packet taken by [`recv_packet`].
#[derive(Debug)]
pub struct Packet {
    /// Bytes written at the start of the buffer (0: the peer closed a
    /// stream, or sent an empty packet).
    pub len: usize,
    /// The descriptors that came with it, close-on-exec.
    pub fds: Vec<OwnedFd>,
}

/// The length of the next packet on a `SOCK_SEQPACKET` (or datagram)
/// socket, without taking it and without blocking: `Ok(None)` when nothing
/// is queued, `Ok(Some(0))` when the peer has closed. Its descriptors stay
/// queued with it (no control buffer is offered, so none is installed).
pub fn peek_len(sock: BorrowedFd<'_>) -> std::io::Result<Option<usize>> {
    let mut empty = [0u8; 0];
    let mut iov = [IoSliceMut::new(&mut empty)];
    match recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        None,
        MsgFlags::MSG_PEEK | MsgFlags::MSG_TRUNC | MsgFlags::MSG_DONTWAIT,
    ) {
        // With MSG_TRUNC the kernel returns the packet's real length.
        Ok(msg) => Ok(Some(msg.bytes)),
        Err(nix::errno::Errno::EAGAIN) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Receives one packet into `buf` with up to [`MAX_FDS`] descriptors, using
/// `space` for the control message; without blocking if `nonblocking`
/// (nothing queued: `WouldBlock`). A packet longer than `buf`
/// (`MSG_TRUNC`: its tail is lost) or with more descriptors than fit
/// (`MSG_CTRUNC`) is an `InvalidData` error naming which, and the
/// descriptors that did arrive are closed.
pub fn recv_packet(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    space: &mut FdSpace,
    nonblocking: bool,
) -> std::io::Result<Packet> {
    let mut flags = MsgFlags::MSG_CMSG_CLOEXEC;
    if nonblocking {
        flags |= MsgFlags::MSG_DONTWAIT;
    }
    let cap = buf.len();
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<()>(sock.as_raw_fd(), &mut iov, Some(&mut space.0), flags)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = cmsg {
            for fd in raw {
                // SAFETY: the kernel just installed `fd` in our table for this
                // message; nothing else owns it yet.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("descriptor list truncated (more than {MAX_FDS} in one packet)"),
        ));
    }
    if msg.flags.contains(MsgFlags::MSG_TRUNC) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("packet truncated (longer than the {cap}-byte buffer)"),
        ));
    }
    Ok(Packet {
        len: msg.bytes,
        fds,
    })
}

/// Receives one message into `buf` with up to [`MAX_FDS`] descriptors, all
/// close-on-exec. Returns the number of bytes (0 at end of stream) and the
/// descriptors. A message whose descriptors did not fit is an error, and the
/// ones that did arrive are closed.
pub fn recv_with_fds(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    recv_with_fds_flags(sock, buf, false)
}

/// [`recv_with_fds`], optionally without blocking.
pub(crate) fn recv_with_fds_flags(
    sock: BorrowedFd<'_>,
    buf: &mut [u8],
    nonblocking: bool,
) -> std::io::Result<(usize, Vec<OwnedFd>)> {
    let p = recv_packet(sock, buf, &mut FdSpace::new(), nonblocking)?;
    Ok((p.len, p.fds))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn passes_a_file_descriptor() {
        let (a, b) = stream_pair().unwrap();
        let mut f = std::fs::File::from(crate::segment::create_memfd(c"t", 0).unwrap());
        f.write_all(b"hello").unwrap();
        send_with_fds(a.as_fd(), b"x", &[f.as_fd()]).unwrap();
        let mut buf = [0u8; 4];
        let (n, fds) = recv_with_fds(b.as_fd(), &mut buf).unwrap();
        assert_eq!((n, fds.len()), (1, 1));
        let mut g = std::fs::File::from(fds.into_iter().next().unwrap());
        g.rewind().unwrap();
        let mut s = String::new();
        g.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
    }

    #[test]
    fn empty_data_is_rejected() {
        let (a, _b) = stream_pair().unwrap();
        assert!(send_with_fds(a.as_fd(), b"", &[]).is_err());
    }

    #[test]
    fn too_many_descriptors_are_refused_by_the_sender() {
        let (a, _b) = seqpacket_pair().unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        let fds = vec![r.as_fd(); MAX_FDS + 1];
        let e = send_with_fds(a.as_fd(), b"x", &fds).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("33 descriptors"), "{e}");
    }

    #[test]
    fn peek_names_the_next_packets_length_and_leaves_it_queued() {
        let (a, b) = seqpacket_pair().unwrap();
        assert_eq!(peek_len(b.as_fd()).unwrap(), None);
        let (r, _w) = nix::unistd::pipe().unwrap();
        send_with_fds(a.as_fd(), &[7u8; 3000], &[r.as_fd(), r.as_fd()]).unwrap();
        send_with_fds(a.as_fd(), b"second", &[]).unwrap();
        assert_eq!(peek_len(b.as_fd()).unwrap(), Some(3000));
        // Peeking installs no descriptor and takes nothing.
        assert_eq!(peek_len(b.as_fd()).unwrap(), Some(3000));
        let mut space = FdSpace::new();
        let mut buf = vec![0u8; 3000];
        let p = recv_packet(b.as_fd(), &mut buf, &mut space, true).unwrap();
        assert_eq!((p.len, p.fds.len()), (3000, 2));
        assert_eq!(peek_len(b.as_fd()).unwrap(), Some(6));
        let p = recv_packet(b.as_fd(), &mut buf, &mut space, true).unwrap();
        assert_eq!(&buf[..p.len], b"second");
        let e = recv_packet(b.as_fd(), &mut buf, &mut space, true).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        drop(a);
        assert_eq!(peek_len(b.as_fd()).unwrap(), Some(0));
    }

    #[test]
    fn a_packet_longer_than_the_buffer_is_an_error_not_a_short_read() {
        let (a, b) = seqpacket_pair().unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        send_with_fds(a.as_fd(), &[1u8; 100], &[r.as_fd()]).unwrap();
        let mut buf = [0u8; 10];
        let e = recv_packet(b.as_fd(), &mut buf, &mut FdSpace::new(), false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("10-byte buffer"), "{e}");
    }
}
