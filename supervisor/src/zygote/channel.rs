//! `SOCK_SEQPACKET` channels carrying one JSON message plus descriptors per
//! packet: between the supervisor and the zygote, and between the
//! supervisor and each worker.
//!
//! The blocking half is used by the single-threaded zygote and by workers;
//! [`AsyncChannel`] is the supervisor's half on tokio.

use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// Largest message on a channel (module-runtime's `protocol::MAX_FRAME`).
pub const MAX_PACKET: usize = 1 << 20;
/// Most descriptors passed with one message.
pub const MAX_FDS: usize = 16;

/// A channel operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket call failed.
    #[error("channel i/o")]
    Io(#[source] std::io::Error),
    /// The peer closed its end.
    #[error("peer closed the channel")]
    Closed,
    /// The message was not the expected JSON.
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
    /// A worker frame did not decode.
    #[error("malformed worker frame")]
    Frame(#[source] module_runtime::protocol::DecodeError),
    /// The message or its descriptors were cut by the kernel.
    #[error("message truncated")]
    Truncated,
}

impl From<nix::Error> for ChannelError {
    fn from(e: nix::Error) -> Self {
        ChannelError::Io(e.into())
    }
}

/// A connected pair of close-on-exec `SOCK_SEQPACKET` sockets.
pub fn pair() -> Result<(OwnedFd, OwnedFd), ChannelError> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

fn send_raw(fd: RawFd, bytes: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    let iov = [IoSlice::new(bytes)];
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &rights };
    sendmsg::<()>(fd, &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
}

fn recv_raw(fd: RawFd, flags: MsgFlags) -> Result<(Vec<u8>, Vec<OwnedFd>), ChannelError> {
    let mut buf = vec![0u8; MAX_PACKET];
    let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
    let mut iov = [IoSliceMut::new(&mut buf)];
    let msg = recvmsg::<()>(
        fd,
        &mut iov,
        Some(&mut space),
        flags | MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(raw) = c {
            for r in raw {
                // SAFETY: the kernel just installed `r` in our table for this
                // message; nothing else refers to it, so we take ownership.
                fds.push(unsafe { OwnedFd::from_raw_fd(r) });
            }
        }
    }
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    let n = msg.bytes;
    if truncated {
        return Err(ChannelError::Truncated);
    }
    if n == 0 {
        return Err(ChannelError::Closed);
    }
    buf.truncate(n);
    Ok((buf, fds))
}

/// Sends one message with descriptors, blocking.
pub fn send<T: Serialize>(
    fd: impl AsFd,
    msg: &T,
    fds: &[BorrowedFd<'_>],
) -> Result<(), ChannelError> {
    let bytes = serde_json::to_vec(msg).expect("messages always serialize");
    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
    loop {
        match send_raw(fd.as_fd().as_raw_fd(), &bytes, &raw) {
            Ok(_) => return Ok(()),
            Err(nix::Error::EINTR) => continue,
            Err(nix::Error::EPIPE) | Err(nix::Error::ECONNRESET) => {
                return Err(ChannelError::Closed)
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one message with its descriptors, blocking.
pub fn recv<T: DeserializeOwned>(fd: impl AsFd) -> Result<(T, Vec<OwnedFd>), ChannelError> {
    loop {
        match recv_raw(fd.as_fd().as_raw_fd(), MsgFlags::empty()) {
            Ok((bytes, fds)) => {
                let msg = serde_json::from_slice(&bytes).map_err(ChannelError::Malformed)?;
                return Ok((msg, fds));
            }
            Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(ChannelError::Io(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                return Err(ChannelError::Closed)
            }
            Err(e) => return Err(e),
        }
    }
}

/// Registers an owned descriptor with the tokio reactor (readable and
/// writable interest); must be called within a runtime.
pub fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is a valid open descriptor that the AsyncFd now owns; an
    // OwnedFd always reports the same raw descriptor and only closes it on
    // drop, so it stays open for the AsyncFd's whole life.
    unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)
}

/// The supervisor's non-blocking end of a channel.
#[derive(Debug)]
pub struct AsyncChannel {
    fd: AsyncFd<OwnedFd>,
}

impl AsyncChannel {
    /// Wraps a channel end; must be called within a tokio runtime.
    pub fn new(fd: OwnedFd) -> Result<Self, ChannelError> {
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags))?;
        Ok(Self {
            fd: register(fd).map_err(ChannelError::Io)?,
        })
    }

    /// Sends one JSON message with descriptors.
    pub async fn send<T: Serialize>(
        &self,
        msg: &T,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        let bytes = serde_json::to_vec(msg).expect("messages always serialize");
        self.send_bytes(&bytes, fds).await
    }

    /// Receives one JSON message with its descriptors. Cancel-safe.
    pub async fn recv<T: DeserializeOwned>(&self) -> Result<(T, Vec<OwnedFd>), ChannelError> {
        let (bytes, fds) = self.recv_bytes().await?;
        let msg = serde_json::from_slice(&bytes).map_err(ChannelError::Malformed)?;
        Ok((msg, fds))
    }

    /// Sends one packet with descriptors.
    pub async fn send_bytes(
        &self,
        bytes: &[u8],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        loop {
            let mut guard = self
                .fd
                .ready(Interest::WRITABLE)
                .await
                .map_err(ChannelError::Io)?;
            match send_raw(self.fd.get_ref().as_raw_fd(), bytes, &raw) {
                Ok(_) => return Ok(()),
                Err(nix::Error::EAGAIN) => guard.clear_ready(),
                Err(nix::Error::EINTR) => {}
                Err(nix::Error::EPIPE) | Err(nix::Error::ECONNRESET) => {
                    return Err(ChannelError::Closed)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Receives one packet with its descriptors. Cancel-safe: a packet is
    /// either taken whole or left in the socket.
    pub async fn recv_bytes(&self) -> Result<(Vec<u8>, Vec<OwnedFd>), ChannelError> {
        loop {
            let mut guard = self
                .fd
                .ready(Interest::READABLE)
                .await
                .map_err(ChannelError::Io)?;
            match recv_raw(self.fd.get_ref().as_raw_fd(), MsgFlags::MSG_DONTWAIT) {
                Ok(packet) => return Ok(packet),
                Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    guard.clear_ready()
                }
                Err(ChannelError::Io(e)) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(ChannelError::Io(e)) if e.raw_os_error() == Some(libc::ECONNRESET) => {
                    return Err(ChannelError::Closed)
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};

    #[test]
    fn passes_messages_and_descriptors() {
        let (a, b) = pair().unwrap();
        let path = std::env::temp_dir().join(format!("ember-chan-{}", std::process::id()));
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.write_all(b"hello").unwrap();
        send(&a, &serde_json::json!({"k": 1}), &[file.as_fd()]).unwrap();
        let (v, fds): (serde_json::Value, _) = recv(&b).unwrap();
        assert_eq!(v["k"], 1);
        assert_eq!(fds.len(), 1);
        let mut got = std::fs::File::from(fds.into_iter().next().unwrap());
        got.rewind().unwrap();
        let mut s = String::new();
        got.read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        drop(a);
        assert!(matches!(
            recv::<serde_json::Value>(&b),
            Err(ChannelError::Closed)
        ));
        std::fs::remove_file(path).unwrap();
    }

    #[tokio::test]
    async fn async_end_talks_to_blocking_end() {
        let (a, b) = pair().unwrap();
        let a = AsyncChannel::new(a).unwrap();
        let t = std::thread::spawn(move || {
            let (v, _): (u32, _) = recv(&b).unwrap();
            send(&b, &(v + 1), &[]).unwrap();
        });
        a.send(&41u32, &[]).await.unwrap();
        let (v, fds): (u32, _) = a.recv().await.unwrap();
        assert_eq!(v, 42);
        assert!(fds.is_empty());
        t.join().unwrap();
        assert!(matches!(a.recv::<u32>().await, Err(ChannelError::Closed)));
    }
}
