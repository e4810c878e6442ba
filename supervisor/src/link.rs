//! The supervisor's end of one worker's channel.
//!
//! Seam: this is the only place that encodes the worker control protocol on
//! the supervisor side: [`encode`] and [`decode`]. Wiring module-runtime
//! means making them `module_runtime::protocol::Message::encode` /
//! `::decode` of its `ToWorker` / `FromWorker` (same shapes as
//! [`crate::worker`]'s messages), and nothing else here.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use crate::worker::{FromWorker, LaunchOrder, ToWorker};
use crate::zygote::channel::{AsyncChannel, ChannelError};

/// Encodes one supervisor-to-worker message.
pub fn encode(msg: &ToWorker) -> Vec<u8> {
    serde_json::to_vec(msg).expect("messages always serialize")
}

/// Decodes one worker-to-supervisor message (bytes written by module code:
/// untrusted, size-limited by the channel).
pub fn decode(bytes: &[u8]) -> Result<FromWorker, ChannelError> {
    serde_json::from_slice(bytes).map_err(ChannelError::Malformed)
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
        let bytes = encode(&ToWorker::Launch(order.clone()));
        self.chan.send_bytes(&bytes, fds).await
    }

    /// Asks for a graceful stop.
    pub async fn stop(&self, deadline: Duration) -> Result<(), ChannelError> {
        let deadline_ms = deadline.as_millis().min(u64::MAX as u128) as u64;
        self.chan
            .send_bytes(&encode(&ToWorker::Stop { deadline_ms }), &[])
            .await
    }

    /// The worker's next report. Cancel-safe.
    pub async fn next(&self) -> Result<FromWorker, ChannelError> {
        // Descriptors a worker attaches are not wanted: dropped (closed).
        let (bytes, _fds) = self.chan.recv_bytes().await?;
        decode(&bytes)
    }
}
