//! Typed services on top of shm-ipc's byte channels: rkyv-archived requests
//! and replies, a client for imports and a fan-in server for exports.
//!
//! A request or reply is serialized once, straight into the channel's slot;
//! the receiver copies it once out of shared memory into an aligned buffer
//! it reuses, validates it there (checked rkyv access: the peer is
//! untrusted and could rewrite shared bytes at any time) and reads it in
//! place, as its archived form: handlers take `&Archived<Req>`, calls
//! return a [`Reply`] that derefs to `&Archived<Resp>`. Nothing is
//! deserialized unless asked for ([`Reply::deserialize`],
//! [`ServiceClient::call_owned`]). The data path is in `service/wire.rs`.
//!
//! ```no_run
//! # use module_runtime::ModuleContext;
//! # use module_runtime::service::{ServiceError, ServiceServer};
//! #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
//! struct Add { a: u64, b: u64 }
//! #[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
//! struct Sum(u64);
//!
//! fn exporter(ctx: &ModuleContext) -> Result<(), ServiceError> {
//!     let mut server = ServiceServer::<Add, Sum>::new();
//!     // `req` is an `&ArchivedAdd`: its fields are archived integers.
//!     server.serve_export(ctx, "adder", |req| Sum(req.a.to_native() + req.b.to_native()))
//! }
//!
//! fn importer(ctx: &ModuleContext) -> Result<u64, ServiceError> {
//!     let mut adder = ctx.import::<Add, Sum>("adder")?;
//!     let reply = adder.call(&Add { a: 2, b: 3 }, None)?;
//!     Ok(reply.0.to_native())
//! }
//! ```
//!
//! # Releases without failed calls
//!
//! An importer's client *follows* its exporter
//! ([`ServiceClient::follow`], [`ModuleContext::import`]): when the
//! supervisor attaches a newer client end (the exporter restarted, or a new
//! revision is ready), the next call switches to it and drops the old one,
//! which the old exporter sees as the client leaving. The check before each
//! call is one atomic load ([`Attachments::generation`]). A call made
//! before any end exists waits for one (up to its deadline, or
//! [`DEFAULT_END_WAIT`]); a call whose exporter is gone is repeated on a
//! newer end when that is sound ([`Retry`]).
//!
//! An exporter's [`ServiceServer::serve_export`] *drains*: once shutdown is
//! requested it keeps serving until every client has left, or no request
//! came for [`DRAIN_QUIET`], or the stop deadline is near, whichever comes
//! first.

use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

pub use shm_ipc::channel::ChannelError;
use shm_ipc::channel::{Client, ClientEnd, ServerEnd};

use crate::sdk::{Attachments, ChannelFds, ModuleContext, Shutdown};

mod wire;
use wire::RecvBuf;
pub use wire::{Reply, SlotSink, Wire};

/// Why a typed call or serve loop failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The channel failed (peer gone, corrupt, timed out, remote error...).
    #[error("service channel failed")]
    Channel(#[from] ChannelError),
    /// A message did not encode or failed validation.
    #[error("invalid service message")]
    Codec(#[source] rkyv::rancor::Error),
    /// The request does not fit the channel's slots; nothing was sent.
    #[error("message of {needed} bytes exceeds the channel's slot capacity, {capacity} bytes")]
    TooLarge {
        /// Bytes the archived message needs.
        needed: usize,
        /// Payload bytes per slot.
        capacity: usize,
    },
    /// No client end of the imported service was available, and none
    /// arrived in time (the exporter is not up yet, or it went away and no
    /// replacement came).
    #[error("no client end of service `{service}` arrived within {waited:?}")]
    NoEnd {
        /// The imported service.
        service: String,
        /// How long the call waited for one.
        waited: Duration,
    },
}

impl ServiceError {
    /// The call's deadline passed before the reply came.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Channel(ChannelError::TimedOut))
    }
}

/// How long a call without a deadline waits for a client end to arrive
/// (no end yet, or the exporter went away): [`ServiceClient::with_end_wait`]
/// changes it.
pub const DEFAULT_END_WAIT: Duration = Duration::from_secs(2);

/// How long a draining exporter waits for a further request before it
/// returns although clients are still connected.
pub const DRAIN_QUIET: Duration = Duration::from_millis(150);

/// How often a serving exporter looks for newly attached ends while the
/// attach descriptor is readable with nothing for it (grants of another
/// kind wait for the module to take them). Otherwise it parks without a
/// deadline on its clients' doorbells and the attach and shutdown
/// descriptors: an idle exporter is never woken.
const STALE_ATTACH_TICK: Duration = Duration::from_millis(20);

/// Which failed calls a following client repeats on a newer client end.
///
/// A request is *sent* once it is published in the channel's ring. If the
/// exporter goes away after that without replying, the client cannot tell
/// whether it was processed: the exporter may have died halfway through
/// (crashed, or killed at its stop deadline). Only the caller knows whether
/// processing it twice is harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retry {
    /// Repeat only requests the old exporter never received: the channel
    /// was known to be dead before the request was published. A request
    /// sent to an exporter that then went away fails with
    /// `ChannelError::PeerGone` (and the next call uses a newer end).
    /// With a draining exporter this does not happen in a release: the
    /// importer switches at its first call after the new end arrived, and
    /// the old exporter keeps serving until its clients left.
    #[default]
    Unsent,
    /// Also repeat, once, a request that was sent but not answered before
    /// the exporter went away. Only for idempotent requests.
    Idempotent,
}

/// What a following client keeps to find newer ends.
#[derive(Debug)]
struct Follow {
    attachments: Attachments,
    name: String,
    /// [`Attachments::generation`] when the attachments were last looked at.
    seen: u64,
    switches: u64,
}

impl Follow {
    fn new(attachments: &Attachments, name: &str) -> Self {
        Self {
            attachments: attachments.clone(),
            name: name.to_owned(),
            // Read before taking the launch-time end, so nothing that
            // arrives in between is missed.
            seen: attachments.generation(),
            switches: 0,
        }
    }

    /// The newest end waiting, if the generation moved (or `force`).
    fn newer(&mut self, force: bool) -> Option<ChannelFds> {
        let g = self.attachments.generation();
        if g == self.seen && !force {
            return None;
        }
        self.seen = g;
        self.attachments.take_latest_import(&self.name).ok()
    }

    fn no_end(&self, waited: Duration) -> ServiceError {
        ServiceError::NoEnd {
            service: self.name.clone(),
            waited,
        }
    }
}

fn open_client(fds: ChannelFds) -> Result<Client, ServiceError> {
    Ok(Client::open(ClientEnd::from_fds(fds.memfd, fds.sock))?)
}

/// A blocking typed client of an imported service.
///
/// Opened on a fixed end ([`open`](Self::open)) it fails once that end's
/// exporter is gone. Opened with [`follow`](Self::follow) (or
/// [`ModuleContext::import`]) it moves to every newer client end the
/// supervisor attaches; see the [module docs](self).
#[derive(Debug)]
pub struct ServiceClient<Req, Resp> {
    /// `None`: no end yet, or the current one's exporter is gone.
    client: Option<Client>,
    follow: Option<Follow>,
    retry: Retry,
    end_wait: Duration,
    /// The last reply, copied out of the channel.
    buf: RecvBuf,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Wire, Resp: Wire> ServiceClient<Req, Resp> {
    /// Opens the client end handed in by the supervisor; the client stays
    /// on it.
    pub fn open(fds: ChannelFds) -> Result<Self, ServiceError> {
        Ok(Self {
            client: Some(open_client(fds)?),
            follow: None,
            retry: Retry::Unsent,
            end_wait: DEFAULT_END_WAIT,
            buf: RecvBuf::default(),
            _types: PhantomData,
        })
    }

    /// A client of the imported service `name` that follows its exporter:
    /// it takes the newest client end available now (granted at launch or
    /// attached since), if any, and switches to newer ones as they arrive.
    /// Fails only if an end is there and cannot be opened.
    pub fn follow(attachments: &Attachments, name: &str) -> Result<Self, ServiceError> {
        let mut follow = Follow::new(attachments, name);
        let client = follow.newer(true).map(open_client).transpose()?;
        Ok(Self {
            client,
            follow: Some(follow),
            retry: Retry::Unsent,
            end_wait: DEFAULT_END_WAIT,
            buf: RecvBuf::default(),
            _types: PhantomData,
        })
    }

    /// Sets which failed calls are repeated on a newer end.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Sets how long a call without a deadline waits for a client end.
    pub fn with_end_wait(mut self, wait: Duration) -> Self {
        self.end_wait = wait;
        self
    }

    /// Whether the client holds an end whose exporter is not known to be
    /// gone.
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    /// How many times a following client moved to a newer end.
    pub fn switches(&self) -> u64 {
        self.follow.as_ref().map_or(0, |f| f.switches)
    }

    /// Switches to a newer end if one arrived (one atomic load when none
    /// did); with `force`, looks at the attachments even if the generation
    /// did not move.
    fn refresh(&mut self, force: bool) {
        let Some(f) = self.follow.as_mut() else {
            return;
        };
        if let Some(fds) = f.newer(force) {
            match open_client(fds) {
                Ok(c) => {
                    if self.client.is_some() {
                        f.switches += 1;
                    }
                    // Dropping the old end tells its exporter we left.
                    self.client = Some(c);
                }
                Err(e) => tracing::warn!(
                    target: "ember::service",
                    "ignoring a new client end of `{}`: {e}",
                    f.name
                ),
            }
        }
    }

    /// Waits until a (newer) end is open or `until` passes.
    fn wait_for_end(&mut self, until: Instant) -> bool {
        loop {
            self.refresh(false);
            if self.client.is_some() {
                return true;
            }
            let Some(f) = self.follow.as_ref() else {
                return false;
            };
            if Instant::now() >= until {
                return false;
            }
            f.attachments.wait_generation(f.seen, until);
        }
    }

    /// Calls the service, waiting at most until `deadline` (`None`: until
    /// the reply or the server's death). A following client first switches
    /// to a newer end if one arrived; without an end it waits for one until
    /// `deadline` (`None`: for the end wait, [`DEFAULT_END_WAIT`]); if the
    /// exporter is gone it repeats the call on a newer end as [`Retry`]
    /// allows.
    ///
    /// The request is serialized straight into the channel's slot; the
    /// reply is copied once into this client's buffer, validated, and read
    /// in place through the returned [`Reply`] (no deserialization; see
    /// [`call_owned`](Self::call_owned) for an owned value).
    pub fn call(
        &mut self,
        req: &Req,
        deadline: Option<Instant>,
    ) -> Result<Reply<'_, Resp>, ServiceError> {
        let started = Instant::now();
        let end_until = deadline.unwrap_or(started + self.end_wait);
        self.refresh(false);
        let mut repeated = false;
        loop {
            if self.client.is_none() && !self.wait_for_end(end_until) {
                return Err(match &self.follow {
                    Some(f) => f.no_end(started.elapsed()),
                    None => ChannelError::PeerGone.into(),
                });
            }
            let following = self.follow.is_some();
            let Some(client) = self.client.as_mut() else {
                continue;
            };
            let id = match wire::send(client, req, deadline) {
                Ok(id) => id,
                // Never published: safe to send again on a newer end.
                Err(ServiceError::Channel(ChannelError::PeerGone)) if following => {
                    self.client = None;
                    continue;
                }
                Err(e) => return Err(e),
            };
            match wire::recv_into(client, id, deadline, &mut self.buf) {
                Ok(()) => break,
                Err(ChannelError::PeerGone) if following => {
                    self.client = None;
                    if self.retry == Retry::Idempotent && !repeated {
                        repeated = true;
                        continue;
                    }
                    return Err(ChannelError::PeerGone.into());
                }
                Err(e) => return Err(e.into()),
            }
        }
        let reply = self.buf.access::<Resp>().map_err(ServiceError::Codec)?;
        Ok(Reply::new(reply))
    }

    /// [`call`](Self::call), then deserializes the reply into an owned
    /// value.
    pub fn call_owned(
        &mut self,
        req: &Req,
        deadline: Option<Instant>,
    ) -> Result<Resp, ServiceError> {
        self.call(req, deadline)?.deserialize()
    }
}

/// An async typed client of an imported service (feature `tokio`); the
/// async counterpart of [`ServiceClient`], following its exporter the same
/// way when made with [`follow`](Self::follow) or
/// [`ModuleContext::import_async`].
///
/// As the blocking client, with [`Retry::Unsent`] it repeats only calls it
/// never published (the end was known dead first); use
/// [`Retry::Idempotent`] where repeating a published one is harmless. A
/// call whose deadline passes while it waits for room in the ring was not
/// published either, but fails with `ChannelError::TimedOut`.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncServiceClient<Req, Resp> {
    client: Option<shm_ipc::channel::AsyncClient>,
    follow: Option<Follow>,
    retry: Retry,
    end_wait: Duration,
    /// The last reply, copied out of the channel.
    buf: RecvBuf,
    _types: PhantomData<fn(Req) -> Resp>,
}

#[cfg(feature = "tokio")]
fn open_async(fds: ChannelFds) -> Result<shm_ipc::channel::AsyncClient, ServiceError> {
    Ok(shm_ipc::channel::AsyncClient::new(open_client(fds)?)?)
}

#[cfg(feature = "tokio")]
impl<Req: Wire, Resp: Wire> AsyncServiceClient<Req, Resp> {
    /// Opens the client end; must be called inside a tokio runtime. The
    /// client stays on this end.
    pub fn open(fds: ChannelFds) -> Result<Self, ServiceError> {
        Ok(Self {
            client: Some(open_async(fds)?),
            follow: None,
            retry: Retry::Unsent,
            end_wait: DEFAULT_END_WAIT,
            buf: RecvBuf::default(),
            _types: PhantomData,
        })
    }

    /// As [`ServiceClient::follow`]; must be called inside a tokio runtime.
    pub fn follow(attachments: &Attachments, name: &str) -> Result<Self, ServiceError> {
        let mut follow = Follow::new(attachments, name);
        let client = follow.newer(true).map(open_async).transpose()?;
        Ok(Self {
            client,
            follow: Some(follow),
            retry: Retry::Unsent,
            end_wait: DEFAULT_END_WAIT,
            buf: RecvBuf::default(),
            _types: PhantomData,
        })
    }

    /// Sets which failed calls are repeated on a newer end.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Sets how long a call without a deadline waits for a client end.
    pub fn with_end_wait(mut self, wait: Duration) -> Self {
        self.end_wait = wait;
        self
    }

    /// Whether the client holds an end whose exporter is not known to be
    /// gone.
    pub fn is_connected(&self) -> bool {
        self.client.is_some()
    }

    /// How many times a following client moved to a newer end.
    pub fn switches(&self) -> u64 {
        self.follow.as_ref().map_or(0, |f| f.switches)
    }

    fn refresh(&mut self) {
        let Some(f) = self.follow.as_mut() else {
            return;
        };
        if let Some(fds) = f.newer(false) {
            match open_async(fds) {
                Ok(c) => {
                    if self.client.is_some() {
                        f.switches += 1;
                    }
                    self.client = Some(c);
                }
                Err(e) => tracing::warn!(
                    target: "ember::service",
                    "ignoring a new client end of `{}`: {e}",
                    f.name
                ),
            }
        }
    }

    async fn wait_for_end(&mut self, until: Instant) -> bool {
        loop {
            self.refresh();
            if self.client.is_some() {
                return true;
            }
            let Some(f) = self.follow.as_ref() else {
                return false;
            };
            if Instant::now() >= until {
                return false;
            }
            f.attachments.wait_generation_async(f.seen, until).await;
        }
    }

    /// Calls the service with no deadline for the reply; a following client
    /// waits at most its end wait ([`DEFAULT_END_WAIT`]) for an end. As
    /// with [`ServiceClient::call`], the request is serialized straight
    /// into the slot and the reply is read in place through [`Reply`]
    /// ([`Reply::deserialize`] for an owned value).
    pub async fn call(&mut self, req: &Req) -> Result<Reply<'_, Resp>, ServiceError> {
        self.call_inner(req, None).await
    }

    /// Calls the service, giving up at `deadline` (the reply, and any wait
    /// for a client end, count against it): `ChannelError::TimedOut` when
    /// the reply is late, [`ServiceError::NoEnd`] when no end came.
    pub async fn call_deadline(
        &mut self,
        req: &Req,
        deadline: Instant,
    ) -> Result<Reply<'_, Resp>, ServiceError> {
        self.call_inner(req, Some(deadline)).await
    }

    /// [`call_deadline`](Self::call_deadline) with `now + timeout`.
    pub async fn call_timeout(
        &mut self,
        req: &Req,
        timeout: Duration,
    ) -> Result<Reply<'_, Resp>, ServiceError> {
        self.call_inner(req, Some(Instant::now() + timeout)).await
    }

    async fn call_inner(
        &mut self,
        req: &Req,
        deadline: Option<Instant>,
    ) -> Result<Reply<'_, Resp>, ServiceError> {
        /// How one attempt on one end ended.
        enum Attempt {
            Answered,
            /// Nothing was published.
            NotSent(ServiceError),
            /// Published, then the reply did not come.
            Sent(ChannelError),
        }
        let started = Instant::now();
        let end_until = deadline.unwrap_or(started + self.end_wait);
        self.refresh();
        let mut repeated = false;
        loop {
            if self.client.is_none() && !self.wait_for_end(end_until).await {
                return Err(match &self.follow {
                    Some(f) => f.no_end(started.elapsed()),
                    None => ChannelError::PeerGone.into(),
                });
            }
            let following = self.follow.is_some();
            let Some(client) = self.client.as_mut() else {
                continue;
            };
            let buf = &mut self.buf;
            let attempt = async {
                let id = match wire::send_async(client, req).await {
                    Ok(id) => id,
                    Err(e) => return Attempt::NotSent(e),
                };
                match wire::recv_into_async(client, id, buf).await {
                    Ok(()) => Attempt::Answered,
                    Err(e) => Attempt::Sent(e),
                }
            };
            let out = match deadline {
                Some(d) => tokio::time::timeout_at(tokio::time::Instant::from_std(d), attempt)
                    .await
                    .unwrap_or(Attempt::Sent(ChannelError::TimedOut)),
                None => attempt.await,
            };
            match out {
                Attempt::Answered => break,
                // Never published: safe to send again on a newer end.
                Attempt::NotSent(ServiceError::Channel(ChannelError::PeerGone)) if following => {
                    self.client = None;
                }
                Attempt::NotSent(e) => return Err(e),
                Attempt::Sent(ChannelError::PeerGone) if following => {
                    self.client = None;
                    if self.retry == Retry::Idempotent && !repeated {
                        repeated = true;
                        continue;
                    }
                    return Err(ChannelError::PeerGone.into());
                }
                Attempt::Sent(e) => return Err(e.into()),
            }
        }
        let reply = self.buf.access::<Resp>().map_err(ServiceError::Codec)?;
        Ok(Reply::new(reply))
    }
}

impl ModuleContext {
    /// A blocking client of the imported service `name` that follows its
    /// exporter across restarts and releases
    /// ([`ServiceClient::follow`] on [`attachments`](Self::attachments)).
    /// One per import per instance: each newer end goes to one client.
    pub fn import<Req: Wire, Resp: Wire>(
        &self,
        name: &str,
    ) -> Result<ServiceClient<Req, Resp>, ServiceError> {
        ServiceClient::follow(&self.attachments(), name)
    }

    /// The async counterpart of [`import`](Self::import) (feature
    /// `tokio`); must be called inside a tokio runtime.
    #[cfg(feature = "tokio")]
    pub fn import_async<Req: Wire, Resp: Wire>(
        &self,
        name: &str,
    ) -> Result<AsyncServiceClient<Req, Resp>, ServiceError> {
        AsyncServiceClient::follow(&self.attachments(), name)
    }
}

/// A typed server of an exported service, fanning in every client channel.
#[derive(Debug)]
pub struct ServiceServer<Req, Resp> {
    server: shm_ipc::service::Server,
    quiet: Duration,
    _types: PhantomData<fn(Req) -> Resp>,
}

impl<Req: Wire, Resp: Wire> Default for ServiceServer<Req, Resp> {
    fn default() -> Self {
        Self::new()
    }
}

/// State of a draining serve loop.
#[derive(Debug, Clone, Copy)]
struct Drain {
    /// Give up (clients still connected) at this point: the stop deadline
    /// minus a reserve for `stop`.
    until: Instant,
    /// When the last request was served (or the drain began).
    last_request: Instant,
    quiet: Duration,
}

impl Drain {
    fn begin(shutdown: &Shutdown, quiet: Duration) -> Self {
        let now = Instant::now();
        let remaining = shutdown.remaining().unwrap_or(Duration::ZERO);
        // Leave a quarter (at most 500 ms) of what is left for `stop`.
        let reserve = (remaining / 4).min(Duration::from_millis(500));
        Self {
            until: now + remaining.saturating_sub(reserve),
            last_request: now,
            quiet,
        }
    }

    fn ends_at(&self) -> Instant {
        match self.last_request.checked_add(self.quiet) {
            Some(q) => self.until.min(q),
            None => self.until,
        }
    }
}

impl<Req: Wire, Resp: Wire> ServiceServer<Req, Resp> {
    /// A server with no clients yet.
    pub fn new() -> Self {
        Self {
            server: shm_ipc::service::Server::new(),
            quiet: DRAIN_QUIET,
            _types: PhantomData,
        }
    }

    /// Sets how long a draining server waits for a further request before
    /// it returns with clients still connected ([`DRAIN_QUIET`] by default).
    pub fn set_drain_quiet(&mut self, quiet: Duration) {
        self.quiet = quiet;
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

    /// Serves the export `name` of `ctx` ([`serve_attached`](Self::serve_attached)
    /// with the context's attachments and shutdown).
    pub fn serve_export(
        &mut self,
        ctx: &ModuleContext,
        name: &str,
        handler: impl FnMut(&rkyv::Archived<Req>) -> Resp,
    ) -> Result<(), ServiceError> {
        self.serve_attached(&ctx.attachments(), &ctx.shutdown(), name, handler)
    }

    /// Serves the export `name`: takes every server end granted at launch
    /// and, while serving, every end attached later (new importers, or
    /// importers' replacement channels), until shutdown is requested and
    /// the drain ends (see [`serve`](Self::serve)).
    pub fn serve_attached(
        &mut self,
        attachments: &Attachments,
        shutdown: &Shutdown,
        name: &str,
        handler: impl FnMut(&rkyv::Archived<Req>) -> Resp,
    ) -> Result<(), ServiceError> {
        let mut seen: Option<u64> = None;
        let mut adopt = |server: &mut Self| -> Result<bool, ServiceError> {
            // One atomic load unless something was attached.
            let g = attachments.generation();
            if seen == Some(g) {
                return Ok(false);
            }
            seen = Some(g);
            for end in attachments.take_exports(name) {
                server.add(end)?;
            }
            Ok(true)
        };
        let attach_fd = attachments.attach_fd();
        self.serve_loop(shutdown, attach_fd, &mut adopt, handler)
    }

    /// Serves requests with `handler` until shutdown is requested, then
    /// drains: keeps serving until every client has left (importers moved
    /// to a newer exporter and dropped their old ends), or no request came
    /// for [`DRAIN_QUIET`] ([`set_drain_quiet`](Self::set_drain_quiet)), or the stop deadline is near (three quarters of
    /// what was left when shutdown was requested, at least what is left
    /// minus 500 ms), whichever comes first. Clients still connected then
    /// are disconnected. A request that fails validation is answered with
    /// an error; a client that corrupts its channel is dropped (and
    /// logged), the others go on.
    ///
    /// Each request is copied once out of shared memory into a buffer the
    /// server reuses, validated there, and `handler` reads it in place
    /// (`&Archived<Req>`, no deserialization); the response it returns is
    /// serialized straight into the reply slot. A response larger than a
    /// slot reaches the client as an error.
    pub fn serve(
        &mut self,
        shutdown: &Shutdown,
        handler: impl FnMut(&rkyv::Archived<Req>) -> Resp,
    ) -> Result<(), ServiceError> {
        self.serve_loop(shutdown, None, &mut |_| Ok(false), handler)
    }

    /// Serves the clients [`add`](Self::add)ed so far, as [`serve`](Self::serve)
    /// does, until every one of them has left; nothing is adopted and no
    /// shutdown is watched. For code that runs outside a module (tests,
    /// benchmarks, a process holding ends it got some other way).
    pub fn serve_until_clients_leave(
        &mut self,
        mut handler: impl FnMut(&rkyv::Archived<Req>) -> Resp,
    ) -> Result<(), ServiceError> {
        let mut buf = RecvBuf::default();
        let gone = self.server.run(None, |_, req, w| {
            wire::answer::<Req, Resp>(&mut buf, req, w, &mut handler)
        })?;
        for g in gone {
            tracing::info!(target: "ember::service", "client left: {g:?}");
        }
        Ok(())
    }

    fn serve_loop(
        &mut self,
        shutdown: &Shutdown,
        attach_fd: Option<std::os::fd::BorrowedFd<'_>>,
        before_tick: &mut dyn FnMut(&mut Self) -> Result<bool, ServiceError>,
        mut handler: impl FnMut(&rkyv::Archived<Req>) -> Resp,
    ) -> Result<(), ServiceError> {
        let mut drain: Option<Drain> = None;
        let served = std::cell::Cell::new(0u64);
        // Every request is copied into this one buffer, reused.
        let mut buf = RecvBuf::default();
        let mut answer = |_id: shm_ipc::service::ClientId,
                          req: shm_ipc::ShmSlice<'_>,
                          w: &mut shm_ipc::SlotWriter<'_>|
         -> Result<(), String> {
            served.set(served.get() + 1);
            wire::answer::<Req, Resp>(&mut buf, req, w, &mut handler)
        };
        loop {
            if drain.is_none() && shutdown.is_requested() {
                let d = Drain::begin(shutdown, self.quiet);
                tracing::info!(
                    target: "ember::service",
                    "shutdown requested: draining {} clients (at most {:?})",
                    self.server.len(),
                    d.until.saturating_duration_since(Instant::now())
                );
                drain = Some(d);
            }
            before_tick(self)?;
            let now = Instant::now();
            if let Some(d) = &drain {
                if self.server.is_empty() {
                    tracing::info!(target: "ember::service", "drained: every client left");
                    break;
                }
                if now >= d.ends_at() {
                    // A last pass without waiting: a request published just
                    // before the quiet time ran out is served, not dropped
                    // with its end (its caller sent it and would fail).
                    let before = served.get();
                    let mut gone = Vec::new();
                    self.server.serve_round(&mut answer, &mut gone);
                    if served.get() != before && now < d.until {
                        if let Some(d) = drain.as_mut() {
                            d.last_request = Instant::now();
                        }
                        continue;
                    }
                    tracing::info!(
                        target: "ember::service",
                        "drain over ({}): disconnecting {} clients",
                        if now >= d.until { "stop deadline near" } else { "no request for a while" },
                        self.server.len()
                    );
                    break;
                }
            }
            // Park without a deadline while serving: a client's doorbell, the
            // attach descriptor (an end to adopt, e.g. a new importer whose
            // first call would wait for it) or the shutdown descriptor wakes
            // it, so an idle exporter is not woken at all. Draining, the
            // shutdown descriptor stays readable: park until the drain ends.
            let attach = match attach_fd {
                // Something arrived since the adoption above: adopt it
                // first.
                Some(fd) if readable_now(fd) => {
                    if before_tick(self)? {
                        continue;
                    }
                    // Readable with nothing new for us: grants of another
                    // kind wait for the module, and parking on it would
                    // spin. Look again after a while.
                    None
                }
                other => other,
            };
            let mut until = drain.as_ref().map(Drain::ends_at);
            if attach_fd.is_some() && attach.is_none() {
                until =
                    Some(until.map_or(now + STALE_ATTACH_TICK, |u| u.min(now + STALE_ATTACH_TICK)));
            }
            let mut wake: Vec<std::os::fd::BorrowedFd<'_>> = attach.into_iter().collect();
            if drain.is_none() {
                wake.push(shutdown.as_fd());
            }
            if self.server.is_empty() {
                // Nothing to serve: wait for shutdown or a new end.
                wait_any(&wake, until);
                continue;
            }
            let before = served.get();
            let gone = self.server.run_or_wake(until, &wake, &mut answer)?;
            if served.get() != before {
                if let Some(d) = drain.as_mut() {
                    d.last_request = Instant::now();
                }
            }
            for g in gone {
                tracing::info!(target: "ember::service", "client left: {g:?}");
            }
        }
        // Whoever is still connected learns now that this exporter is gone.
        self.server = shm_ipc::service::Server::new();
        Ok(())
    }
}

/// Whether `fd` is readable, without waiting.
fn readable_now(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::ZERO), Ok(n) if n > 0)
}

/// Waits until one of `fds` becomes readable or `until` passes (`None`:
/// no deadline).
fn wait_any(fds: &[std::os::fd::BorrowedFd<'_>], until: Option<Instant>) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let timeout = match until {
        None => PollTimeout::NONE,
        Some(u) => {
            // Rounded up: waking before the deadline would only loop.
            let ms = u
                .saturating_duration_since(Instant::now())
                .as_micros()
                .div_ceil(1000);
            PollTimeout::try_from(ms.min(i32::MAX as u128) as i32).unwrap_or(PollTimeout::MAX)
        }
    };
    let mut polled: Vec<PollFd<'_>> = fds
        .iter()
        .map(|fd| PollFd::new(*fd, PollFlags::POLLIN))
        .collect();
    // EINTR or a failure only ends this wait early; the loop looks again.
    let _ = poll(&mut polled, timeout);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
    struct Ping {
        n: u32,
        text: String,
    }

    use crate::abi::GrantKind;
    use crate::sdk::test_host::TestHost;
    use shm_ipc::channel::{channel_pair, ChannelConfig, ServerChannel};

    fn pair() -> (ChannelFds, ChannelFds) {
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        let (cm, cs) = c.into_fds();
        let (sm, ss) = s.into_fds();
        (
            ChannelFds {
                memfd: cm,
                sock: cs,
            },
            ChannelFds {
                memfd: sm,
                sock: ss,
            },
        )
    }

    fn ping(n: u32) -> Ping {
        Ping {
            n,
            text: String::new(),
        }
    }

    /// An exporter in a thread: answers every request with its own `tag`
    /// in `text` until its client leaves; returns how many it served.
    fn exporter(end: ChannelFds, tag: &'static str) -> std::thread::JoinHandle<u32> {
        std::thread::spawn(move || {
            let mut ch = ServerChannel::open(ServerEnd::from_fds(end.memfd, end.sock)).unwrap();
            let mut buf = RecvBuf::default();
            let mut served = 0;
            loop {
                let r = ch.serve_next(None, |req, w| {
                    wire::answer::<Ping, Ping>(&mut buf, req, w, &mut |p| Ping {
                        n: p.n.to_native(),
                        text: tag.into(),
                    })
                });
                match r {
                    Ok(()) => served += 1,
                    Err(ChannelError::PeerGone) => return served,
                    Err(e) => panic!("exporter {tag}: {e}"),
                }
            }
        })
    }

    #[test]
    fn a_following_client_switches_to_a_newer_end() {
        let (c1, s1) = pair();
        let host = TestHost::new(vec![(GrantKind::Import, "svc", c1)]);
        let ctx = host.context();
        let mut client: ServiceClient<Ping, Ping> = ctx.import("svc").unwrap();
        let old = exporter(s1, "old");
        let r = client.call(&ping(1), None).unwrap();
        assert_eq!((r.n.to_native(), r.text.as_str()), (1, "old"));

        let (c2, s2) = pair();
        let new = exporter(s2, "new");
        host.attach(GrantKind::Import, "svc", c2);
        let r = client.call(&ping(2), None).unwrap();
        assert_eq!((r.n.to_native(), r.text.as_str()), (2, "new"));
        assert_eq!(client.switches(), 1);
        // The old exporter saw its client leave after one request.
        assert_eq!(old.join().unwrap(), 1);
        drop(client);
        assert_eq!(new.join().unwrap(), 1);
    }

    /// An exporter that takes one request and dies without answering it,
    /// after the supervisor attached a replacement end (`then`).
    fn dies_mid_request(end: ChannelFds, then: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            let mut ch = ServerChannel::open(ServerEnd::from_fds(end.memfd, end.sock)).unwrap();
            let mut then = Some(then);
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                ch.serve_next(None, |_req, _w| {
                    if let Some(f) = then.take() {
                        f();
                    }
                    // Leaves the handler without a reply, as a crash does
                    // (resume_unwind skips the panic hook's noise).
                    std::panic::resume_unwind(Box::new("exporter died"))
                })
            }));
            assert!(r.is_err());
            drop(ch);
        });
    }

    #[test]
    fn a_call_whose_exporter_died_is_repeated_on_the_new_end_only_if_idempotent() {
        // Idempotent: the request the dead exporter took is sent again on
        // the end that arrived meanwhile.
        let (c1, s1) = pair();
        let host = TestHost::new(vec![(GrantKind::Import, "svc", c1)]);
        let ctx = host.context();
        let mut client: ServiceClient<Ping, Ping> =
            ctx.import("svc").unwrap().with_retry(Retry::Idempotent);
        let (c2, s2) = pair();
        let new = exporter(s2, "new");
        dies_mid_request(s1, move || host.attach(GrantKind::Import, "svc", c2));
        let deadline = Instant::now() + Duration::from_secs(30);
        let r = client.call(&ping(7), Some(deadline)).unwrap();
        assert_eq!((r.n.to_native(), r.text.as_str()), (7, "new"));
        drop(client);
        assert_eq!(new.join().unwrap(), 1);

        // Unsent (the default): that request may have been processed, so it
        // fails; the next call goes to the new end.
        let (c1, s1) = pair();
        let host = TestHost::new(vec![(GrantKind::Import, "svc", c1)]);
        let ctx = host.context();
        let mut client: ServiceClient<Ping, Ping> = ctx.import("svc").unwrap();
        let (c2, s2) = pair();
        let new = exporter(s2, "new");
        dies_mid_request(s1, move || host.attach(GrantKind::Import, "svc", c2));
        let e = client.call(&ping(8), Some(deadline)).unwrap_err();
        assert!(
            matches!(e, ServiceError::Channel(ChannelError::PeerGone)),
            "{e:?}"
        );
        assert!(!client.is_connected());
        let r = client.call(&ping(9), Some(deadline)).unwrap();
        assert_eq!((r.n.to_native(), r.text.as_str()), (9, "new"));
        drop(client);
        assert_eq!(new.join().unwrap(), 1);
    }

    #[test]
    fn a_call_waits_for_the_first_end_and_gives_up_at_its_deadline() {
        let host = TestHost::new(vec![]);
        let ctx = host.context();
        let mut client: ServiceClient<Ping, Ping> = ctx.import("svc").unwrap();
        assert!(!client.is_connected());
        // Nothing arrives: NoEnd at the deadline.
        let e = client.call(&ping(1), Some(Instant::now())).unwrap_err();
        assert!(matches!(e, ServiceError::NoEnd { .. }), "{e:?}");
        // The end arrives from another thread while (or before) the call
        // waits; either way the call is answered.
        let (c, s) = pair();
        let srv = exporter(s, "late");
        let attacher = std::thread::spawn(move || host.attach(GrantKind::Import, "svc", c));
        let r = client
            .call(&ping(2), Some(Instant::now() + Duration::from_secs(30)))
            .unwrap();
        assert_eq!(r.text, "late");
        attacher.join().unwrap();
        drop(client);
        assert_eq!(srv.join().unwrap(), 1);
    }

    fn echo_server(
        host: &'static TestHost,
        quiet: Duration,
    ) -> std::thread::JoinHandle<Result<(), ServiceError>> {
        std::thread::spawn(move || {
            let ctx = host.context();
            let shutdown = ctx.shutdown();
            let mut server = ServiceServer::<Ping, Ping>::new();
            server.set_drain_quiet(quiet);
            server.serve_export(&ctx, "svc", |p| Ping {
                n: p.n.to_native(),
                text: if shutdown.is_requested() {
                    "draining".into()
                } else {
                    "serving".into()
                },
            })
        })
    }

    #[test]
    fn a_draining_server_serves_after_shutdown_and_returns_once_clients_left() {
        let (c1, s1) = pair();
        let host = TestHost::new(vec![(GrantKind::Export, "svc", s1)]);
        // No quiet limit and a far deadline: only leaving clients end it.
        let server = echo_server(host, Duration::from_secs(3600));
        let mut a = ServiceClient::<Ping, Ping>::open(c1).unwrap();
        assert_eq!(a.call(&ping(1), None).unwrap().text.as_str(), "serving");

        host.request_shutdown(Duration::from_secs(3600));
        // A client attached after the request is adopted and served: the
        // loop went on after it saw the shutdown.
        let (c2, s2) = pair();
        host.attach(GrantKind::Export, "svc", s2);
        let mut b = ServiceClient::<Ping, Ping>::open(c2).unwrap();
        assert_eq!(b.call(&ping(2), None).unwrap().text.as_str(), "draining");
        assert_eq!(a.call(&ping(3), None).unwrap().text.as_str(), "draining");
        drop(a);
        assert_eq!(b.call(&ping(4), None).unwrap().text.as_str(), "draining");
        assert!(!server.is_finished());
        drop(b);
        server.join().unwrap().unwrap();
    }

    #[test]
    fn a_draining_server_gives_up_on_idle_clients_after_the_quiet_period() {
        let (c1, s1) = pair();
        let host = TestHost::new(vec![(GrantKind::Export, "svc", s1)]);
        let server = echo_server(host, DRAIN_QUIET);
        let mut a = ServiceClient::<Ping, Ping>::open(c1).unwrap();
        assert_eq!(a.call(&ping(1), None).unwrap().text.as_str(), "serving");
        host.request_shutdown(Duration::from_secs(3600));
        server.join().unwrap().unwrap();
        // It disconnected the client that never left.
        let e = a.call(&ping(2), None).unwrap_err();
        assert!(
            matches!(e, ServiceError::Channel(ChannelError::PeerGone)),
            "{e:?}"
        );
    }

    #[test]
    fn a_release_moves_the_importer_without_a_failed_call() {
        // The importer and two revisions of the exporter, each with its own
        // host; the supervisor's part is played by the test.
        let (c1, s1) = pair();
        let importer = TestHost::new(vec![(GrantKind::Import, "svc", c1)]);
        let old_host = TestHost::new(vec![(GrantKind::Export, "svc", s1)]);
        let old = echo_server(old_host, Duration::from_secs(3600));
        let ctx = importer.context();
        let mut client: ServiceClient<Ping, Ping> = ctx.import("svc").unwrap();
        assert_eq!(
            client.call(&ping(1), None).unwrap().text.as_str(),
            "serving"
        );

        // The new revision is up; the importer gets its end, then the old
        // exporter is asked to stop.
        let (c2, s2) = pair();
        let new_host = TestHost::new(vec![(GrantKind::Export, "svc", s2)]);
        let new = echo_server(new_host, Duration::from_secs(3600));
        importer.attach(GrantKind::Import, "svc", c2);
        old_host.request_shutdown(Duration::from_secs(3600));
        // The old exporter waits for its client; the next call moves.
        assert_eq!(
            client.call(&ping(2), None).unwrap().text.as_str(),
            "serving"
        );
        assert_eq!(client.switches(), 1);
        old.join().unwrap().unwrap();
        new_host.request_shutdown(Duration::from_secs(3600));
        drop(client);
        new.join().unwrap().unwrap();
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn the_async_client_follows_and_repeats_idempotent_calls() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let (c1, s1) = pair();
            let host = TestHost::new(vec![(GrantKind::Import, "svc", c1)]);
            let ctx = host.context();
            let mut client: AsyncServiceClient<Ping, Ping> = ctx
                .import_async("svc")
                .unwrap()
                .with_retry(Retry::Idempotent);
            let old = exporter(s1, "old");
            let r = client.call_timeout(&ping(1), Duration::from_secs(30)).await;
            assert_eq!(r.unwrap().text, "old");

            // A newer end: the next call moves to it.
            let (c2, s2) = pair();
            let new = exporter(s2, "new");
            host.attach(GrantKind::Import, "svc", c2);
            let r = client.call(&ping(2)).await.unwrap();
            assert_eq!(r.text, "new");
            assert_eq!(client.switches(), 1);
            assert_eq!(old.join().unwrap(), 1);

            // The next end's exporter dies holding the request; the call is
            // repeated on the end attached meanwhile.
            let (c3, s3) = pair();
            let (c4, s4) = pair();
            let last = exporter(s4, "last");
            dies_mid_request(s3, move || host.attach(GrantKind::Import, "svc", c4));
            host.attach(GrantKind::Import, "svc", c3);
            let r = client.call_timeout(&ping(3), Duration::from_secs(30)).await;
            assert_eq!(r.unwrap().text, "last");
            assert_eq!(new.join().unwrap(), 1);
            drop(client);
            assert_eq!(last.join().unwrap(), 1);
        });
    }

    fn open_pair(cfg: &ChannelConfig) -> (ServiceClient<Ping, Ping>, ServerChannel) {
        let (c, s) = channel_pair(cfg).unwrap();
        let (cm, cs) = c.into_fds();
        let client = ServiceClient::open(ChannelFds {
            memfd: cm,
            sock: cs,
        })
        .unwrap();
        (client, ServerChannel::open(s).unwrap())
    }

    #[test]
    fn typed_call_over_a_real_channel_reads_both_sides_in_place() {
        let (mut client, mut ch) = open_pair(&ChannelConfig::default());
        let server = std::thread::spawn(move || {
            let mut buf = RecvBuf::default();
            for _ in 0..2 {
                ch.serve_next(None, |req, w| {
                    wire::answer::<Ping, Ping>(&mut buf, req, w, &mut |p| Ping {
                        n: p.n.to_native() + 1,
                        text: p.text.to_uppercase(),
                    })
                })
                .unwrap();
            }
        });
        let hi = Ping {
            n: 1,
            text: "hi".into(),
        };
        let r = client.call(&hi, None).unwrap();
        assert_eq!((r.n.to_native(), r.text.as_str()), (2, "HI"));
        assert_eq!(
            r.deserialize().unwrap(),
            Ping {
                n: 2,
                text: "HI".into()
            }
        );
        assert_eq!(
            client.call_owned(&ping(5), None).unwrap(),
            Ping {
                n: 6,
                text: String::new()
            }
        );
        server.join().unwrap();
    }

    #[test]
    fn a_request_larger_than_a_slot_is_refused_with_its_size_and_not_sent() {
        let cfg = ChannelConfig {
            slots: 2,
            slot_capacity: 256,
        };
        let (mut client, mut ch) = open_pair(&cfg);
        let big = Ping {
            n: 1,
            text: "x".repeat(1000),
        };
        let size = rkyv::to_bytes::<rkyv::rancor::Error>(&big).unwrap().len();
        let e = client.call(&big, None).unwrap_err();
        assert!(
            matches!(e, ServiceError::TooLarge { needed, capacity: 256 } if needed == size),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("{size} bytes")), "{e}");
        // Nothing was published: the server finds no request.
        let mut buf = RecvBuf::default();
        let mut handler = |p: &ArchivedPing| Ping {
            n: p.n.to_native(),
            text: "x".repeat(p.n.to_native() as usize),
        };
        let mut serve = |ch: &mut ServerChannel| {
            ch.serve_one(&mut |req, w| wire::answer::<Ping, Ping>(&mut buf, req, w, &mut handler))
                .unwrap()
        };
        assert!(!serve(&mut ch));
        // A reply that does not fit reaches the client as an error naming
        // its size; the channel goes on.
        let id = wire::send(client.client.as_mut().unwrap(), &ping(1000), None).unwrap();
        assert!(serve(&mut ch));
        let mut rbuf = RecvBuf::default();
        let e = wire::recv_into(client.client.as_mut().unwrap(), id, None, &mut rbuf).unwrap_err();
        assert!(
            matches!(&e, ChannelError::Remote(m) if m.contains("exceeds the slot capacity, 256 bytes")),
            "{e}"
        );
        let id = wire::send(client.client.as_mut().unwrap(), &ping(3), None).unwrap();
        assert!(serve(&mut ch));
        wire::recv_into(client.client.as_mut().unwrap(), id, None, &mut rbuf).unwrap();
        assert_eq!(rbuf.access::<Ping>().unwrap().text.as_str(), "xxx");
    }

    #[test]
    fn a_request_that_fails_validation_is_answered_with_an_error() {
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        let mut raw = Client::open(c).unwrap();
        let mut ch = ServerChannel::open(s).unwrap();
        let mut buf = RecvBuf::default();
        // Too short for a root; a string that is not UTF-8 (`n`, then an
        // inline string: two bytes, padded with 0xff). All 0xff is valid:
        // n = u32::MAX and an empty inline string.
        let not_utf8 = [0, 0, 0, 0, 0xc3, 0x28, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff];
        for garbage in [&[][..], &[0xff; 3], &not_utf8] {
            let id = raw.send_with(None, |w| w.write(garbage)).unwrap();
            assert!(ch
                .serve_one(&mut |req, w| {
                    wire::answer::<Ping, Ping>(&mut buf, req, w, &mut |_| unreachable!())
                })
                .unwrap());
            let e = raw.recv_reply(id, None, |_| ()).unwrap_err();
            assert!(
                matches!(&e, ChannelError::Remote(m) if m.starts_with("invalid request")),
                "{e}"
            );
        }
    }

    #[test]
    fn the_handler_reads_a_private_copy_the_client_can_no_longer_change() {
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        // The client's own view of the segment, to rewrite the request
        // while the server handles it (as a hostile client could).
        let memfd = c.fds()[0].try_clone_to_owned().unwrap();
        let mut client = Client::open(c).unwrap();
        let mut ch = ServerChannel::open(s).unwrap();
        let req = Ping {
            n: 7,
            text: "original text".into(),
        };
        let id = wire::send(&mut client, &req, None).unwrap();
        let mut buf = RecvBuf::default();
        let mut seen = None;
        ch.serve_one(&mut |msg, w| {
            wire::answer::<Ping, Ping>(&mut buf, msg, w, &mut |p| {
                // Request slot 0's payload: docs/shm-layout.md.
                nix::sys::uio::pwrite(&memfd, &[0xAA; 4096], 4096 + 64).unwrap();
                seen = Some((p.n.to_native(), p.text.to_string()));
                ping(0)
            })
        })
        .unwrap();
        assert_eq!(seen, Some((7, "original text".to_string())));
        let mut rbuf = RecvBuf::default();
        wire::recv_into(&mut client, id, None, &mut rbuf).unwrap();
    }

    #[test]
    fn the_receive_buffer_is_reused_and_holds_the_last_message_only() {
        let (mut client, mut ch) = open_pair(&ChannelConfig {
            slots: 2,
            slot_capacity: 64 * 1024,
        });
        let server = std::thread::spawn(move || {
            let mut buf = RecvBuf::default();
            let mut grew = Vec::new();
            for _ in 0..3 {
                ch.serve_next(None, |req, w| {
                    let r = wire::answer::<Ping, Ping>(&mut buf, req, w, &mut |p| Ping {
                        n: p.n.to_native(),
                        text: p.text.to_string(),
                    });
                    grew.push(buf.allocated());
                    r
                })
                .unwrap();
            }
            grew
        });
        for len in [40_000, 3, 40_000] {
            let p = Ping {
                n: len,
                text: "y".repeat(len as usize),
            };
            let r = client.call(&p, None).unwrap();
            assert_eq!(r.text.len(), len as usize);
            assert_eq!(r.n, len);
        }
        let grew = server.join().unwrap();
        // One allocation, for the first large request, kept for the rest.
        assert_eq!(grew[0], grew[1], "{grew:?}");
        assert_eq!(grew[1], grew[2], "{grew:?}");
    }
}
