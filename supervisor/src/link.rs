//! The supervisor's end of one worker's channel.
//!
//! This is the only place that encodes the worker control protocol on the
//! supervisor side: [`encode`] and [`decode`], module-runtime's `EMBW`
//! frames (docs/abi.md).

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use crate::worker::{FromWorker, Grant, LaunchOrder, Message, ToWorker};
use crate::zygote::channel::{AsyncChannel, ChannelError};

/// Encodes one supervisor-to-worker message.
pub fn encode(msg: &ToWorker) -> Vec<u8> {
    msg.encode()
}

/// Decodes one worker-to-supervisor message (bytes written by module code:
/// untrusted, size-limited by the channel).
pub fn decode(bytes: &[u8]) -> Result<FromWorker, ChannelError> {
    FromWorker::decode(bytes).map_err(ChannelError::Frame)
}

/// A worker's first message did not come.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The channel failed.
    #[error("worker channel")]
    Channel(#[source] ChannelError),
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

/// The supervisor's end of a worker channel.
#[derive(Debug)]
pub struct WorkerLink {
    chan: AsyncChannel,
}

impl WorkerLink {
    /// Wraps the channel end received from the zygote.
    pub fn new(fd: OwnedFd) -> Result<Self, ChannelError> {
        Ok(Self {
            chan: AsyncChannel::new(fd)?,
        })
    }

    /// Waits for the worker's `Idle`.
    pub async fn wait_idle(&self, timeout: Duration) -> Result<IdleInfo, HandshakeError> {
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
    ) -> Result<(), ChannelError> {
        self.send(&ToWorker::Launch(order.clone()), fds).await
    }

    /// Asks for a graceful stop.
    pub async fn stop(&self, deadline: Duration) -> Result<(), ChannelError> {
        self.chan
            .send_bytes(&encode(&ToWorker::Stop { deadline }), &[])
            .await
    }

    /// Hands a running instance more grants (service ends).
    pub async fn attach(
        &self,
        grants: &[Grant],
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), ChannelError> {
        self.send(&ToWorker::Attach(grants.to_vec()), fds).await
    }

    /// Sends one message with descriptors: several packets if there are
    /// more than one packet carries (see
    /// [`module_runtime::protocol::packets`]), back to back.
    pub async fn send(&self, msg: &ToWorker, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        for (frame, fds) in module_runtime::protocol::packets(encode(msg), fds) {
            self.chan.send_bytes(&frame, fds).await?;
        }
        Ok(())
    }

    /// The worker's next report. Cancel-safe.
    pub async fn next(&self) -> Result<FromWorker, ChannelError> {
        // Descriptors a worker attaches are not wanted: dropped (closed).
        let (bytes, _fds) = self.chan.recv_bytes().await?;
        decode(&bytes)
    }
}
