//! The supervisor's ends of its control links (to the zygote, to each
//! worker) on tokio: module-runtime's transport (`module_runtime::transport`:
//! `SOCK_SEQPACKET`, `EMBW` frames, `SCM_RIGHTS`) on a non-blocking socket,
//! woken by the reactor. The transport does the framing, the descriptors
//! and the buffers; this file only waits for readiness.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use module_runtime::protocol::Message;
use module_runtime::transport::{self, Link};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

use crate::worker::{FromWorker, Grant, LaunchOrder, ToWorker};

pub use module_runtime::transport::LinkError;

/// Registers an owned descriptor with the tokio reactor (readable and
/// writable interest); must be called within a runtime.
pub fn register(fd: OwnedFd) -> std::io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: `fd` is a valid open descriptor that the AsyncFd now owns; an
    // OwnedFd always reports the same raw descriptor and only closes it on
    // drop, so it stays open for the AsyncFd's whole life.
    unsafe { AsyncFd::register(fd) }.map_err(std::io::Error::from)
}

/// One end of a control link on the async runtime, sending `Out` and
/// receiving `In`.
#[derive(Debug)]
pub struct AsyncLink<Out: Message, In: Message> {
    link: AsyncFd<Link<Out, In>>,
}

impl<Out: Message, In: Message> AsyncLink<Out, In> {
    /// Wraps a connected `SOCK_SEQPACKET` socket (made non-blocking here);
    /// must be called within a tokio runtime.
    pub fn new(fd: OwnedFd) -> Result<Self, LinkError> {
        let io = |e: nix::Error| LinkError::Io(e.into());
        let flags = nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io)?;
        let flags = nix::fcntl::OFlag::from_bits_retain(flags) | nix::fcntl::OFlag::O_NONBLOCK;
        nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io)?;
        // SAFETY: the Link owns the descriptor and reports the same raw
        // number for its whole life; it closes it only when dropped, which
        // the AsyncFd does after deregistering.
        let link = unsafe { AsyncFd::register(Link::new(fd)) }
            .map_err(|e| LinkError::Io(std::io::Error::from(e)))?;
        Ok(Self { link })
    }

    /// Sends one message with its descriptors (continuation packets for
    /// more than one packet carries, back to back).
    pub async fn send(&self, msg: &Out, fds: &[BorrowedFd<'_>]) -> Result<(), LinkError> {
        for (frame, fds) in transport::packets(msg.encode(), fds) {
            loop {
                let mut guard = self
                    .link
                    .ready(Interest::WRITABLE)
                    .await
                    .map_err(LinkError::Io)?;
                match transport::send_packet(self.link.get_ref().fd(), &frame, fds) {
                    Err(e) if e.is_would_block() => guard.clear_ready(),
                    r => {
                        r?;
                        break;
                    }
                }
            }
        }
        Ok(())
    }

    /// Receives one message with its descriptors. Cancel-safe: a packet is
    /// either taken whole or left in the socket, and a message waiting for
    /// its continuation packets stays in the link.
    pub async fn recv(&mut self) -> Result<(In, Vec<OwnedFd>), LinkError> {
        loop {
            let mut guard = self
                .link
                .ready_mut(Interest::READABLE)
                .await
                .map_err(LinkError::Io)?;
            match guard.get_inner_mut().try_recv()? {
                Some(m) => return Ok(m),
                None => guard.clear_ready(),
            }
        }
    }
}

/// A worker's first message did not come.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The channel failed.
    #[error("worker channel")]
    Channel(#[source] LinkError),
    /// It sent something else first.
    #[error("worker did not start with Idle")]
    Protocol,
    /// It said nothing in time.
    #[error("worker silent for {0:?}")]
    Timeout(Duration),
}

/// What a warm worker says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdleInfo {
    /// Its pid, as it sees it.
    pub pid: u32,
    /// Module ABI version it speaks.
    pub abi_version: u32,
    /// SDK version.
    pub sdk_version: String,
}

/// The supervisor's end of a worker's control link.
#[derive(Debug)]
pub struct WorkerLink {
    chan: AsyncLink<ToWorker, FromWorker>,
}

impl WorkerLink {
    /// Wraps the channel end received from the zygote.
    pub fn new(fd: OwnedFd) -> Result<Self, LinkError> {
        Ok(Self {
            chan: AsyncLink::new(fd)?,
        })
    }

    /// Waits for the worker's `Idle`.
    pub async fn wait_idle(&mut self, timeout: Duration) -> Result<IdleInfo, HandshakeError> {
        match tokio::time::timeout(timeout, self.next()).await {
            Err(_) => Err(HandshakeError::Timeout(timeout)),
            Ok(Err(e)) => Err(HandshakeError::Channel(e)),
            Ok(Ok(FromWorker::Idle {
                pid,
                abi_version,
                sdk_version,
            })) => Ok(IdleInfo {
                pid,
                abi_version,
                sdk_version,
            }),
            Ok(Ok(_)) => Err(HandshakeError::Protocol),
        }
    }

    /// Sends the launch order with its grants' descriptors.
    pub async fn launch(
        &self,
        order: &LaunchOrder,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), LinkError> {
        self.send(&ToWorker::Launch(order.clone()), fds).await
    }

    /// Asks for a graceful stop.
    pub async fn stop(&self, deadline: Duration) -> Result<(), LinkError> {
        self.send(&ToWorker::Stop { deadline }, &[]).await
    }

    /// Has an idle worker join the cgroups whose `tasks` files these are
    /// (see `Limiter::adopt`).
    pub async fn join_cgroups(&self, tasks: &[BorrowedFd<'_>]) -> Result<(), LinkError> {
        let count = u32::try_from(tasks.len()).unwrap_or(u32::MAX);
        self.send(&ToWorker::JoinCgroups { count }, tasks).await
    }

    /// Hands a running instance more grants (service ends).
    pub async fn attach(&self, grants: &[Grant], fds: &[BorrowedFd<'_>]) -> Result<(), LinkError> {
        self.send(&ToWorker::Attach(grants.to_vec()), fds).await
    }

    /// Sends one message with descriptors.
    pub async fn send(&self, msg: &ToWorker, fds: &[BorrowedFd<'_>]) -> Result<(), LinkError> {
        self.chan.send(msg, fds).await
    }

    /// The worker's next report (bytes written by module code: untrusted,
    /// decoded by the transport). Cancel-safe.
    pub async fn next(&mut self) -> Result<FromWorker, LinkError> {
        // A worker's reports carry no descriptors; any it attaches make the
        // message malformed (and are closed).
        let (msg, _fds) = self.chan.recv().await?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use module_runtime::protocol::{FromZygote, ToZygote, WorkerChannel};
    use std::os::fd::AsFd;

    #[tokio::test]
    async fn async_end_talks_to_blocking_end() {
        let (a, b) = transport::socket_pair().unwrap();
        let mut ours = AsyncLink::<ToZygote, FromZygote>::new(a).unwrap();
        let t = std::thread::spawn(move || {
            let mut theirs = Link::<FromZygote, ToZygote>::new(b);
            let (msg, _) = theirs.recv().unwrap();
            let ToZygote::Fork { id } = msg else {
                panic!("{msg:?}")
            };
            let (r, w) = nix::unistd::pipe().unwrap();
            theirs
                .send(&FromZygote::Forked { id, pid: 7 }, &[r.as_fd(), w.as_fd()])
                .unwrap();
        });
        ours.send(&ToZygote::Fork { id: 41 }, &[]).await.unwrap();
        let (msg, fds) = ours.recv().await.unwrap();
        assert_eq!(msg, FromZygote::Forked { id: 41, pid: 7 });
        assert_eq!(fds.len(), 2);
        t.join().unwrap();
        assert!(matches!(ours.recv().await, Err(LinkError::Closed)));
    }

    #[tokio::test]
    async fn a_worker_report_with_descriptors_is_refused() {
        let (a, b) = transport::socket_pair().unwrap();
        let mut link = WorkerLink::new(a).unwrap();
        let (r, _w) = nix::unistd::pipe().unwrap();
        transport::send_packet(
            b.as_fd(),
            &module_runtime::protocol::Message::encode(&FromWorker::Idle {
                pid: 1,
                abi_version: 1,
                sdk_version: "x".into(),
            }),
            &[r.as_fd()],
        )
        .unwrap();
        assert!(matches!(
            link.next().await,
            Err(LinkError::Descriptors {
                expected: 0,
                arrived: 1
            })
        ));
        let worker = WorkerChannel::new(b);
        worker
            .send(
                &FromWorker::Idle {
                    pid: 2,
                    abi_version: 1,
                    sdk_version: "x".into(),
                },
                &[],
            )
            .unwrap();
        assert_eq!(link.wait_idle(Duration::from_secs(5)).await.unwrap().pid, 2);
    }
}
