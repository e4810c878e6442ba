//! Typed services on top of shm-ipc's byte channels: rkyv-archived requests
//! and replies, a client for imports and a fan-in server for exports.
//!
//! Requests and replies are copied out of shared memory into an aligned
//! buffer and validated (checked rkyv access) before use: the peer is
//! untrusted and could rewrite shared bytes at any time.

use std::marker::PhantomData;
use std::time::Instant;

use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor::{self, Strategy};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::util::AlignedVec;
use shm_ipc::channel::{ChannelError, Client, ClientEnd, ServerEnd};

use crate::sdk::{ChannelFds, Shutdown};

/// Why a typed call or serve loop failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The channel failed (peer gone, corrupt, timed out, remote error...).
    #[error("service channel failed")]
    Channel(#[from] ChannelError),
    /// A message did not encode or failed validation.
    #[error("invalid service message")]
    Codec(#[source] rancor::Error),
}

/// A type that travels over a service: archived with rkyv, validated on
/// receipt. Implemented for every rkyv type with checkable archives.
pub trait Wire: Sized {
    /// Archives `self`.
    fn to_wire(&self) -> Result<AlignedVec, rancor::Error>;
    /// Validates and deserializes an archive (any alignment).
    fn from_wire(bytes: &[u8]) -> Result<Self, rancor::Error>;
}

impl<T> Wire for T
where
    T: rkyv::Archive
        + for<'a> rkyv::Serialize<HighSerializer<AlignedVec, ArenaHandle<'a>, rancor::Error>>,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, Strategy<Pool, rancor::Error>>,
{
    fn to_wire(&self) -> Result<AlignedVec, rancor::Error> {
        rkyv::to_bytes::<rancor::Error>(self)
    }

    fn from_wire(bytes: &[u8]) -> Result<Self, rancor::Error> {
        let mut aligned = AlignedVec::<16>::with_capacity(bytes.len());
        aligned.extend_from_slice(bytes);
        rkyv::from_bytes::<T, rancor::Error>(&aligned)
    }
}

fn copy_out(s: shm_ipc::ShmSlice<'_>) -> Vec<u8> {
    s.to_vec()
}

/// A blocking typed client of an imported service.
#[derive(Debug)]
pub struct ServiceClient<Req, Resp> {
    client: Client,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Wire, Resp: Wire> ServiceClient<Req, Resp> {
    /// Opens the client end handed in by the supervisor.
    pub fn open(fds: ChannelFds) -> Result<Self, ServiceError> {
        Ok(Self {
            client: Client::open(ClientEnd::from_fds(fds.memfd, fds.sock))?,
            _types: PhantomData,
        })
    }

    /// Calls the service, waiting at most until `deadline` (`None`: until
    /// the reply or the server's death).
    pub fn call(&mut self, req: &Req, deadline: Option<Instant>) -> Result<Resp, ServiceError> {
        let bytes = req.to_wire().map_err(ServiceError::Codec)?;
        let reply = match deadline {
            Some(d) => self.client.call_deadline(&bytes, d)?,
            None => self.client.call(&bytes)?,
        };
        Resp::from_wire(&reply).map_err(ServiceError::Codec)
    }
}

/// An async typed client of an imported service (feature `tokio`).
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncServiceClient<Req, Resp> {
    client: shm_ipc::channel::AsyncClient,
    _types: PhantomData<fn(Req) -> Resp>,
}

#[cfg(feature = "tokio")]
impl<Req: Wire, Resp: Wire> AsyncServiceClient<Req, Resp> {
    /// Opens the client end; must be called inside a tokio runtime.
    pub fn open(fds: ChannelFds) -> Result<Self, ServiceError> {
        let c = Client::open(ClientEnd::from_fds(fds.memfd, fds.sock))?;
        Ok(Self {
            client: shm_ipc::channel::AsyncClient::new(c)?,
            _types: PhantomData,
        })
    }

    /// Calls the service.
    pub async fn call(&mut self, req: &Req) -> Result<Resp, ServiceError> {
        let bytes = req.to_wire().map_err(ServiceError::Codec)?;
        let reply = self.client.call_with(|w| w.write(&bytes), copy_out).await?;
        Resp::from_wire(&reply).map_err(ServiceError::Codec)
    }
}

/// A typed server of an exported service, fanning in every client channel.
#[derive(Debug)]
pub struct ServiceServer<Req, Resp> {
    server: shm_ipc::service::Server,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Wire, Resp: Wire> Default for ServiceServer<Req, Resp> {
    fn default() -> Self {
        Self::new()
    }
}

impl<Req: Wire, Resp: Wire> ServiceServer<Req, Resp> {
    /// A server with no clients yet.
    pub fn new() -> Self {
        Self {
            server: shm_ipc::service::Server::new(),
            _types: PhantomData,
        }
    }

    /// Adds a server end handed in by the supervisor.
    pub fn add(&mut self, fds: ChannelFds) -> Result<(), ServiceError> {
        self.server.add(ServerEnd::from_fds(fds.memfd, fds.sock))?;
        Ok(())
    }

    /// Number of connected clients.
    pub fn clients(&self) -> usize {
        self.server.len()
    }

    /// Serves the export `name` of `ctx`: takes every server end granted at
    /// launch and, while serving, every end attached later (new importers),
    /// until shutdown is requested.
    pub fn serve_export(
        &mut self,
        ctx: &crate::ModuleContext,
        name: &str,
        handler: impl FnMut(Req) -> Resp,
    ) -> Result<(), ServiceError> {
        let mut adopt = |server: &mut Self| -> Result<(), ServiceError> {
            ctx.accept_attached();
            for end in ctx.take_exports(name) {
                server.add(end)?;
            }
            Ok(())
        };
        self.serve_loop(&ctx.shutdown(), &mut adopt, handler)
    }

    /// Serves requests with `handler` until `shutdown` is requested. A
    /// request that fails validation is answered with an error; a client
    /// that corrupts its channel is dropped (and logged), the others go on.
    pub fn serve(
        &mut self,
        shutdown: &Shutdown,
        handler: impl FnMut(Req) -> Resp,
    ) -> Result<(), ServiceError> {
        self.serve_loop(shutdown, &mut |_| Ok(()), handler)
    }

    fn serve_loop(
        &mut self,
        shutdown: &Shutdown,
        before_tick: &mut dyn FnMut(&mut Self) -> Result<(), ServiceError>,
        mut handler: impl FnMut(Req) -> Resp,
    ) -> Result<(), ServiceError> {
        let tick = std::time::Duration::from_millis(50);
        while !shutdown.is_requested() {
            before_tick(self)?;
            if self.server.is_empty() {
                shutdown.wait_timeout(tick);
                continue;
            }
            let gone = self
                .server
                .run(Some(Instant::now() + tick), |_id, req, w| {
                    let req = Req::from_wire(&copy_out(req))
                        .map_err(|e| format!("invalid request: {e}"))?;
                    let resp = handler(req)
                        .to_wire()
                        .map_err(|e| format!("cannot encode reply: {e}"))?;
                    w.write(&resp).map_err(|e| e.to_string())
                })?;
            for g in gone {
                tracing::info!(target: "ember::service", "client left: {g:?}");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct Ping {
        n: u32,
        text: String,
    }

    #[test]
    fn wire_round_trip_and_rejects_garbage() {
        let p = Ping {
            n: 7,
            text: "x".into(),
        };
        let b = p.to_wire().unwrap();
        // Misaligned copy still decodes.
        let mut shifted = vec![0u8];
        shifted.extend_from_slice(&b);
        assert_eq!(Ping::from_wire(&shifted[1..]).unwrap(), p);
        assert!(Ping::from_wire(&[0xff; 3]).is_err());
    }

    #[test]
    fn typed_call_over_a_real_channel() {
        let (c, s) =
            shm_ipc::channel::channel_pair(&shm_ipc::channel::ChannelConfig::default()).unwrap();
        let (cm, cs) = c.into_fds();
        let mut client: ServiceClient<Ping, Ping> = ServiceClient::open(ChannelFds {
            memfd: cm,
            sock: cs,
        })
        .unwrap();
        let server = std::thread::spawn(move || {
            let mut ch = shm_ipc::channel::ServerChannel::open(s).unwrap();
            ch.serve_next(None, |req, w| {
                let p = Ping::from_wire(&req.to_vec()).map_err(|e| e.to_string())?;
                let r = Ping {
                    n: p.n + 1,
                    text: p.text.to_uppercase(),
                };
                w.write(&r.to_wire().unwrap()).map_err(|e| e.to_string())
            })
            .unwrap();
        });
        let r = client
            .call(
                &Ping {
                    n: 1,
                    text: "hi".into(),
                },
                None,
            )
            .unwrap();
        assert_eq!(
            r,
            Ping {
                n: 2,
                text: "HI".into()
            }
        );
        server.join().unwrap();
    }
}
