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
//! # Replicas, restarts and releases
//!
//! An importer's client holds one channel per exporter instance it may
//! call: the supervisor gives every importing instance a channel to every
//! ready replica of the exporter. Calls go round-robin over them (the
//! async client, shared between tasks, keeps one call in flight per
//! channel, so concurrent calls use every replica).
//!
//! A *following* client ([`ModuleContext::import`],
//! [`ServiceClient::follow`]) adopts every end the supervisor attaches
//! later: a replica that became ready, a restarted exporter, a new
//! revision. The check before each call is one atomic load
//! ([`Attachments::generation`]); only when it moved does the client take
//! the new ends and drop the channels whose exporter is gone. It leaves a
//! channel whose exporter drains (shuts down) as soon as another channel
//! serves, which lets that exporter finish.
//!
//! When an exporter goes away under a call, a request it never took goes
//! to another channel (or waits for a replacement end until the deadline);
//! one it took and did not answer is repeated only with
//! [`Retry::Idempotent`], else the call fails with [`ServiceError::Lost`].
//! A call made while no channel exists waits for one (up to its deadline,
//! or [`DEFAULT_END_WAIT`]).
//!
//! An exporter's [`ServiceServer::serve_export`] *drains*: once shutdown is
//! requested it marks its channels draining and keeps serving until every
//! client has left, or no request came for [`DRAIN_QUIET`], or the stop
//! deadline is near, whichever comes first.

use std::collections::VecDeque;
use std::marker::PhantomData;
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

pub use shm_ipc::channel::ChannelError;
use shm_ipc::channel::{Client, ClientEnd, ServerEnd};

use crate::sdk::{Attachments, ChannelFds, ModuleContext, Shutdown};

mod wire;
#[cfg(feature = "tokio")]
pub use wire::AsyncReply;
use wire::RecvBuf;
pub use wire::{Reply, SlotSink, Wire};

/// Why a typed call or serve loop failed. The cause is in `source()`;
/// [`error_chain`](crate::error_chain) renders the whole chain
/// (`service channel failed: peer is gone`).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The channel failed (corrupt, timed out, the handler's error...), or
    /// every end of a client on fixed ends is gone (`PeerGone`).
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
    /// The client held no channel of the imported service, and none
    /// arrived in time (the exporter is not up yet, or it went away and no
    /// replacement came).
    #[error("no exporter of service `{service}` connected within {waited:?}")]
    NoEnd {
        /// The imported service.
        service: String,
        /// How long the call waited for one.
        waited: Duration,
    },
    /// The exporter took the request and went away (crashed, killed)
    /// without replying, so it may have been processed; it was not
    /// repeated ([`Retry::Unsent`]), or was repeated once and lost again.
    #[error(
        "the exporter{} went away with the request unanswered; it may have been processed",
        of_service(service)
    )]
    Lost {
        /// The imported service (empty for a client on fixed ends).
        service: String,
    },
}

fn of_service(service: &str) -> String {
    if service.is_empty() {
        String::new()
    } else {
        format!(" of service `{service}`")
    }
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

/// Which failed calls a client repeats on another channel.
///
/// A channel's exporter may go away (a crash, `kill -9`, its stop
/// deadline) while a call is on it. The exporter marks each request as
/// taken in the channel before its handler runs (`docs/shm-layout.md`), so
/// the client can tell the two cases apart:
/// - the exporter never took the request: it is sent on another channel
///   (another replica, or the replacement that arrives within the
///   deadline), whatever `Retry` says: nothing was processed;
/// - the exporter took it and went away without a reply: it may have been
///   processed, halfway or wholly. Only the caller knows whether
///   processing it twice is harmless; this is what `Retry` decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Retry {
    /// Repeat only requests no exporter took. One that was taken and never
    /// answered fails with [`ServiceError::Lost`]; the next call uses
    /// another channel. With a draining exporter this does not happen in
    /// a release or a scale-down: clients leave a draining exporter for
    /// one that serves, and the draining one answers what it took.
    #[default]
    Unsent,
    /// Also repeat, once, a request that was taken but not answered
    /// before its exporter went away. Only for idempotent requests.
    Idempotent,
}

/// How one call on one channel ended without a reply.
#[derive(Debug)]
enum Attempt {
    /// The exporter went away before it took the request: sending it on
    /// another channel is safe.
    Untaken,
    /// The exporter took the request and went away without replying.
    Taken,
    /// Anything else (deadline, remote handler error, codec, corrupt).
    Failed(ServiceError),
}

fn failed(e: impl Into<ServiceError>) -> Attempt {
    Attempt::Failed(e.into())
}

/// One call on one chosen channel: the request is serialized straight
/// into the slot, the reply copied once into `buf` (validated by the
/// caller, read in place). The client's data path; which channel, failover
/// and retries are the caller's.
fn call_on<Req: Wire>(
    client: &mut Client,
    req: &Req,
    deadline: Option<Instant>,
    buf: &mut RecvBuf,
) -> Result<(), Attempt> {
    let id = match wire::send(client, req, deadline) {
        Ok(id) => id,
        Err(ServiceError::Channel(ChannelError::PeerGone)) => return Err(Attempt::Untaken),
        Err(e) => return Err(failed(e)),
    };
    match wire::recv_into(client, id, deadline, buf) {
        Ok(()) => Ok(()),
        Err(ChannelError::PeerGone) if client.taken(id) => Err(Attempt::Taken),
        Err(ChannelError::PeerGone) => Err(Attempt::Untaken),
        Err(e) => Err(failed(e)),
    }
}

/// [`call_on`] for the async client.
#[cfg(feature = "tokio")]
async fn call_on_async<Req: Wire>(
    client: &mut shm_ipc::channel::AsyncClient,
    req: &Req,
    deadline: Option<Instant>,
    buf: &mut RecvBuf,
) -> Result<(), Attempt> {
    let exchange = async {
        let id = match wire::send_async(client, req).await {
            Ok(id) => id,
            Err(ServiceError::Channel(ChannelError::PeerGone)) => return Err(Attempt::Untaken),
            Err(e) => return Err(failed(e)),
        };
        match wire::recv_into_async(client, id, buf).await {
            Ok(()) => Ok(()),
            Err(ChannelError::PeerGone) if client.client().taken(id) => Err(Attempt::Taken),
            Err(ChannelError::PeerGone) => Err(Attempt::Untaken),
            Err(e) => Err(failed(e)),
        }
    };
    match deadline {
        Some(d) => tokio::time::timeout_at(tokio::time::Instant::from_std(d), exchange)
            .await
            .unwrap_or(Err(failed(ChannelError::TimedOut))),
        None => exchange.await,
    }
}

/// Whether a failed call left its channel unusable.
fn breaks_channel(e: &ServiceError) -> bool {
    matches!(e, ServiceError::Channel(ChannelError::Corrupt(_)))
}

/// A channel end a client holds.
trait End: Sized {
    fn open(fds: ChannelFds) -> Result<Self, ServiceError>;
    /// The exporter said it drains.
    fn draining(&self) -> bool;
    /// The exporter is gone (checked without waiting).
    fn check_gone(&mut self) -> bool;
}

impl End for Client {
    fn open(fds: ChannelFds) -> Result<Self, ServiceError> {
        Ok(Client::open(ClientEnd::from_fds(fds.memfd, fds.sock))?)
    }
    fn draining(&self) -> bool {
        Client::draining(self)
    }
    fn check_gone(&mut self) -> bool {
        self.check_peer_gone()
    }
}

#[cfg(feature = "tokio")]
impl End for shm_ipc::channel::AsyncClient {
    fn open(fds: ChannelFds) -> Result<Self, ServiceError> {
        Ok(shm_ipc::channel::AsyncClient::new(<Client as End>::open(
            fds,
        )?)?)
    }
    fn draining(&self) -> bool {
        self.client().draining()
    }
    fn check_gone(&mut self) -> bool {
        self.check_peer_gone()
    }
}

/// What a following client keeps to find new ends.
#[derive(Debug)]
struct Follow {
    attachments: Attachments,
    /// [`Attachments::generation`] when the attachments were last looked at.
    seen: u64,
}

/// The channels a client holds, one per exporter instance it may call,
/// where new ones come from, and which one is next.
#[derive(Debug)]
struct Ends<C> {
    /// Channels free for a call, in round-robin order: the next at the
    /// front.
    idle: VecDeque<C>,
    /// Channels out on a call (the async client lends them).
    busy: usize,
    /// Of those, how many were not draining when lent.
    busy_serving: usize,
    follow: Option<Follow>,
    /// The imported service (empty for a client on fixed ends).
    service: String,
    /// Ends adopted after the first.
    adopted: u64,
}

/// What a call gets from [`Ends::lend`].
#[cfg(feature = "tokio")]
enum Lent<C> {
    /// A channel, and whether it was not draining.
    Channel(C, bool),
    /// Every channel is out on a call.
    Busy,
    /// No channel at all.
    Empty,
}

impl<C: End> Ends<C> {
    fn fixed(ends: impl IntoIterator<Item = ChannelFds>) -> Result<Self, ServiceError> {
        Ok(Self {
            idle: ends.into_iter().map(C::open).collect::<Result<_, _>>()?,
            busy: 0,
            busy_serving: 0,
            follow: None,
            service: String::new(),
            adopted: 0,
        })
    }

    fn following(attachments: &Attachments, name: &str) -> Result<Self, ServiceError> {
        let mut ends = Self {
            idle: VecDeque::new(),
            busy: 0,
            busy_serving: 0,
            follow: Some(Follow {
                attachments: attachments.clone(),
                // Read before taking the launch-time ends, so nothing that
                // arrives in between is missed.
                seen: attachments.generation(),
            }),
            service: name.to_owned(),
            adopted: 0,
        };
        for fds in attachments.take_imports(name) {
            ends.idle.push_back(C::open(fds)?);
        }
        Ok(ends)
    }

    fn len(&self) -> usize {
        self.idle.len() + self.busy
    }

    /// Adopts the ends attached since the last look (one atomic load when
    /// none were) and drops the channels whose exporter is gone; `force`
    /// looks even if the generation did not move. A new end goes to the
    /// front: it is usually a replacement, or a replica that just became
    /// ready.
    fn refresh(&mut self, force: bool) {
        let Some(f) = self.follow.as_mut() else {
            return;
        };
        let g = f.attachments.generation();
        if g == f.seen && !force {
            return;
        }
        f.seen = g;
        let new = f.attachments.take_imports(&self.service);
        self.idle.retain_mut(|c| !c.check_gone());
        for fds in new {
            match C::open(fds) {
                Ok(c) => {
                    if self.len() > 0 {
                        self.adopted += 1;
                    }
                    self.idle.push_front(c);
                }
                Err(e) => tracing::warn!(
                    target: "ember::service",
                    "ignoring a new client end of `{}`: {}",
                    self.service,
                    crate::sdk::error_chain(&e)
                ),
            }
        }
    }

    /// The channel for the next call. A draining channel at the front is
    /// dropped when another channel serves (its exporter waits for its
    /// clients to leave); it is kept, and used, while it is the only one.
    fn front(&mut self) -> Option<&mut C> {
        loop {
            let c = self.idle.front()?;
            if !c.draining() {
                break;
            }
            let other = self.busy_serving > 0 || self.idle.iter().skip(1).any(|c| !c.draining());
            if !other {
                break;
            }
            self.idle.pop_front();
        }
        self.idle.front_mut()
    }

    /// The front channel served a call: the next call goes to the next one.
    fn rotate(&mut self) {
        if self.idle.len() > 1 {
            self.idle.rotate_left(1);
        }
    }

    /// Lends the next channel out for a call.
    #[cfg(feature = "tokio")]
    fn lend(&mut self) -> Lent<C> {
        if self.front().is_none() {
            return if self.busy > 0 {
                Lent::Busy
            } else {
                Lent::Empty
            };
        }
        let Some(c) = self.idle.pop_front() else {
            return Lent::Empty;
        };
        let serving = !c.draining();
        self.busy += 1;
        self.busy_serving += usize::from(serving);
        Lent::Channel(c, serving)
    }

    /// A lent channel comes back (`None`: it was dropped).
    #[cfg(feature = "tokio")]
    fn give_back(&mut self, c: Option<C>, serving: bool) {
        self.busy -= 1;
        self.busy_serving -= usize::from(serving);
        if let Some(c) = c {
            self.idle.push_back(c);
        }
    }

    fn no_end(&self, waited: Duration) -> ServiceError {
        match self.follow {
            Some(_) => ServiceError::NoEnd {
                service: self.service.clone(),
                waited,
            },
            None => ChannelError::PeerGone.into(),
        }
    }

    fn lost(&self) -> ServiceError {
        ServiceError::Lost {
            service: self.service.clone(),
        }
    }

    /// Until when, and on what, a call without a channel waits for an end.
    fn end_wait(&self) -> Option<(Attachments, u64)> {
        self.follow
            .as_ref()
            .map(|f| (f.attachments.clone(), f.seen))
    }
}

/// A blocking typed client of an imported service.
///
/// It holds one channel per exporter instance it may call and spreads
/// calls over them, round-robin. Made by [`ModuleContext::import`] (or
/// [`follow`](Self::follow)) it adopts every end the supervisor attaches
/// later (a new replica, a restarted or released exporter) and drops the
/// channels whose exporter is gone or draining; made by
/// [`open`](Self::open) it stays on the ends it was given. See the
/// [module docs](self).
#[derive(Debug)]
pub struct ServiceClient<Req, Resp> {
    ends: Ends<Client>,
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
        Self::open_all([fds])
    }

    /// Opens several client ends (one per exporter instance) and spreads
    /// calls over them; the client stays on these.
    pub fn open_all(ends: impl IntoIterator<Item = ChannelFds>) -> Result<Self, ServiceError> {
        Ok(Self::with_ends(Ends::fixed(ends)?))
    }

    /// A client of the imported service `name` that follows its exporter
    /// instances: it takes every client end available now (granted at
    /// launch or attached since), and adopts those attached later. Fails
    /// only if an end is there and cannot be opened.
    pub fn follow(attachments: &Attachments, name: &str) -> Result<Self, ServiceError> {
        Ok(Self::with_ends(Ends::following(attachments, name)?))
    }

    fn with_ends(ends: Ends<Client>) -> Self {
        Self {
            ends,
            retry: Retry::Unsent,
            end_wait: DEFAULT_END_WAIT,
            buf: RecvBuf::default(),
            _types: PhantomData,
        }
    }

    /// Sets which failed calls are repeated on another channel.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Sets how long a call without a deadline waits for a client end.
    pub fn with_end_wait(mut self, wait: Duration) -> Self {
        self.end_wait = wait;
        self
    }

    /// Whether the client holds a channel whose exporter is not known to
    /// be gone.
    pub fn is_connected(&self) -> bool {
        self.ends.len() > 0
    }

    /// How many channels (exporter instances) the client holds.
    pub fn channels(&self) -> usize {
        self.ends.len()
    }

    /// How many ends a following client adopted after its first (new
    /// replicas, restarted or released exporters).
    pub fn switches(&self) -> u64 {
        self.ends.adopted
    }

    /// Waits until a channel is open or `until` passes.
    fn wait_for_end(&mut self, until: Instant) -> bool {
        loop {
            self.ends.refresh(false);
            if self.ends.len() > 0 {
                return true;
            }
            let Some((attachments, seen)) = self.ends.end_wait() else {
                return false;
            };
            if Instant::now() >= until {
                return false;
            }
            attachments.wait_generation(seen, until);
        }
    }

    /// Calls the service, waiting at most until `deadline` (`None`: until
    /// the reply or the exporter's death). A following client first adopts
    /// the ends that arrived (one atomic load when none did); the call
    /// goes to the next channel in turn, and to another one if that
    /// channel's exporter went away before taking it; one taken and lost
    /// is repeated as [`Retry`] says. Without a channel the call waits for
    /// an end until `deadline` (`None`: for the end wait,
    /// [`DEFAULT_END_WAIT`]).
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
        self.ends.refresh(false);
        let mut repeated = false;
        loop {
            let Some(channel) = self.ends.front() else {
                if !self.wait_for_end(end_until) {
                    return Err(self.ends.no_end(started.elapsed()));
                }
                continue;
            };
            match call_on(channel, req, deadline, &mut self.buf) {
                Ok(()) => {
                    self.ends.rotate();
                    break;
                }
                Err(Attempt::Untaken) => {
                    self.ends.idle.pop_front();
                }
                Err(Attempt::Taken) => {
                    self.ends.idle.pop_front();
                    if self.retry == Retry::Idempotent && !repeated {
                        repeated = true;
                        continue;
                    }
                    return Err(self.ends.lost());
                }
                Err(Attempt::Failed(e)) => {
                    if breaks_channel(&e) {
                        self.ends.idle.pop_front();
                    } else {
                        self.ends.rotate();
                    }
                    return Err(e);
                }
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

    /// [`call`](Self::call) with the deadline `now + timeout`.
    pub fn call_timeout(
        &mut self,
        req: &Req,
        timeout: Duration,
    ) -> Result<Reply<'_, Resp>, ServiceError> {
        self.call(req, Some(Instant::now() + timeout))
    }
}

/// An async typed client of an imported service (feature `tokio`); the
/// async counterpart of [`ServiceClient`], with the same constructors,
/// channels, failover and [`Retry`], and the same `call(req, deadline)`.
///
/// It takes `&self`: share it between tasks (in an `Arc`, no mutex).
/// Concurrent calls go out on different channels, one call per channel at
/// a time, so a client with a channel to each of two exporter replicas
/// keeps both busy; calls finding every channel busy queue, first come
/// first served, and each is handed the next channel that comes back
/// (until its deadline).
///
/// A reply is copied once into a buffer the client keeps for reuse and is
/// read in place through the returned [`AsyncReply`], which gives the
/// buffer back when dropped.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncServiceClient<Req, Resp> {
    pool: std::sync::Mutex<Channels>,
    retry: Retry,
    end_wait: Duration,
    /// Reply buffers not lent to an [`AsyncReply`], for reuse.
    spare: std::sync::Mutex<Vec<RecvBuf>>,
    _types: PhantomData<fn(Req) -> Resp>,
}

#[cfg(feature = "tokio")]
type AsyncEnd = shm_ipc::channel::AsyncClient;

/// What a queued call is handed.
#[cfg(feature = "tokio")]
#[derive(Debug)]
enum Handoff {
    /// A channel, lent to it (and whether it was not draining).
    Channel(AsyncEnd, bool),
    /// No channel is left: look again (and wait for an end).
    Look,
}

/// The async client's channels and the calls waiting for one.
#[cfg(feature = "tokio")]
#[derive(Debug)]
struct Channels {
    ends: Ends<AsyncEnd>,
    /// Calls waiting for a channel, first come first served.
    queue: VecDeque<tokio::sync::oneshot::Sender<Handoff>>,
}

#[cfg(feature = "tokio")]
impl Channels {
    /// Hands free channels to the queued calls, in order; tells them all
    /// to look again when no channel is left at all.
    fn dispatch(&mut self) {
        while let Some(tx) = self.queue.pop_front() {
            match self.ends.lend() {
                Lent::Channel(c, serving) => {
                    if let Err(Handoff::Channel(c, serving)) = tx.send(Handoff::Channel(c, serving))
                    {
                        // That call gave up meanwhile.
                        self.ends.give_back(Some(c), serving);
                    }
                }
                Lent::Busy => {
                    self.queue.push_front(tx);
                    return;
                }
                Lent::Empty => {
                    let _ = tx.send(Handoff::Look);
                }
            }
        }
    }

    /// A lent channel comes back (`None`: dropped): to the first queued
    /// call, else to the free ones.
    fn give_back(&mut self, c: Option<AsyncEnd>, serving: bool) {
        self.ends.give_back(c, serving);
        self.dispatch();
    }
}

/// A channel lent to one call; it goes back (or, dropped, is forgotten)
/// when the call ends, also when the call's future is dropped.
#[cfg(feature = "tokio")]
struct Lease<'a, Req, Resp> {
    owner: &'a AsyncServiceClient<Req, Resp>,
    channel: Option<AsyncEnd>,
    serving: bool,
}

#[cfg(feature = "tokio")]
impl<Req, Resp> Drop for Lease<'_, Req, Resp> {
    fn drop(&mut self) {
        self.owner
            .lock()
            .give_back(self.channel.take(), self.serving);
    }
}

/// A call's place in the queue. Dropped before it was served (its deadline
/// passed, or its future was dropped), it gives back a channel handed to
/// it meanwhile.
#[cfg(feature = "tokio")]
struct Queued<'a, Req, Resp> {
    owner: &'a AsyncServiceClient<Req, Resp>,
    rx: tokio::sync::oneshot::Receiver<Handoff>,
    done: bool,
}

#[cfg(feature = "tokio")]
impl<Req, Resp> Queued<'_, Req, Resp> {
    async fn handoff(&mut self) -> Handoff {
        let h = (&mut self.rx).await.unwrap_or(Handoff::Look);
        self.done = true;
        h
    }
}

#[cfg(feature = "tokio")]
impl<Req, Resp> Drop for Queued<'_, Req, Resp> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Nothing can be handed to it from now on; what was is given back.
        self.rx.close();
        if let Ok(Handoff::Channel(c, serving)) = self.rx.try_recv() {
            self.owner.lock().give_back(Some(c), serving);
        }
    }
}

#[cfg(feature = "tokio")]
impl<Req, Resp> AsyncServiceClient<Req, Resp> {
    fn lock(&self) -> std::sync::MutexGuard<'_, Channels> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a call found when it asked for a channel.
#[cfg(feature = "tokio")]
enum Ask {
    Channel(AsyncEnd, bool),
    Queued(tokio::sync::oneshot::Receiver<Handoff>),
    Empty,
}

#[cfg(feature = "tokio")]
impl<Req: Wire, Resp: Wire> AsyncServiceClient<Req, Resp> {
    /// Opens the client end; must be called inside a tokio runtime. The
    /// client stays on this end.
    pub fn open(fds: ChannelFds) -> Result<Self, ServiceError> {
        Self::open_all([fds])
    }

    /// As [`ServiceClient::open_all`]; must be called inside a tokio
    /// runtime.
    pub fn open_all(ends: impl IntoIterator<Item = ChannelFds>) -> Result<Self, ServiceError> {
        Ok(Self::with_ends(Ends::fixed(ends)?))
    }

    /// As [`ServiceClient::follow`]; must be called inside a tokio runtime.
    pub fn follow(attachments: &Attachments, name: &str) -> Result<Self, ServiceError> {
        Ok(Self::with_ends(Ends::following(attachments, name)?))
    }

    fn with_ends(ends: Ends<AsyncEnd>) -> Self {
        Self {
            pool: std::sync::Mutex::new(Channels {
                ends,
                queue: VecDeque::new(),
            }),
            retry: Retry::Unsent,
            end_wait: DEFAULT_END_WAIT,
            spare: std::sync::Mutex::new(Vec::new()),
            _types: PhantomData,
        }
    }

    /// Sets which failed calls are repeated on another channel.
    pub fn with_retry(mut self, retry: Retry) -> Self {
        self.retry = retry;
        self
    }

    /// Sets how long a call without a deadline waits for a client end.
    pub fn with_end_wait(mut self, wait: Duration) -> Self {
        self.end_wait = wait;
        self
    }

    /// Whether the client holds a channel whose exporter is not known to
    /// be gone.
    pub fn is_connected(&self) -> bool {
        self.lock().ends.len() > 0
    }

    /// How many channels (exporter instances) the client holds.
    pub fn channels(&self) -> usize {
        self.lock().ends.len()
    }

    /// How many ends a following client adopted after its first.
    pub fn switches(&self) -> u64 {
        self.lock().ends.adopted
    }

    /// A channel for a call, or its place in the queue.
    fn ask(&self) -> Ask {
        let mut pool = self.lock();
        pool.ends.refresh(false);
        // New ends go to the calls that queued first.
        pool.dispatch();
        if !pool.queue.is_empty() {
            let (tx, rx) = tokio::sync::oneshot::channel();
            pool.queue.push_back(tx);
            return Ask::Queued(rx);
        }
        match pool.ends.lend() {
            Lent::Channel(c, serving) => Ask::Channel(c, serving),
            Lent::Busy => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                pool.queue.push_back(tx);
                Ask::Queued(rx)
            }
            Lent::Empty => Ask::Empty,
        }
    }

    /// Calls the service, as [`ServiceClient::call`]: `deadline` bounds
    /// the wait for a free channel, for an end and for the reply (`None`:
    /// no bound on the reply; an end is waited for [`DEFAULT_END_WAIT`]).
    /// As with [`ServiceClient::call`], the request is serialized straight
    /// into the slot and the reply is read in place through [`AsyncReply`]
    /// ([`AsyncReply::deserialize`], or [`call_owned`](Self::call_owned),
    /// for an owned value).
    pub async fn call(
        &self,
        req: &Req,
        deadline: Option<Instant>,
    ) -> Result<AsyncReply<'_, Resp>, ServiceError> {
        let mut buf = self.take_buf();
        self.call_into(req, deadline, &mut buf).await?;
        AsyncReply::new(buf, &self.spare)
    }

    /// [`call`](Self::call), then deserializes the reply into an owned
    /// value.
    pub async fn call_owned(
        &self,
        req: &Req,
        deadline: Option<Instant>,
    ) -> Result<Resp, ServiceError> {
        self.call(req, deadline).await?.deserialize()
    }

    /// A reply buffer: a spare one, or a new one.
    fn take_buf(&self) -> RecvBuf {
        self.spare
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
            .unwrap_or_default()
    }

    /// The call, leaving the reply's bytes (not yet validated) in `buf`.
    async fn call_into(
        &self,
        req: &Req,
        deadline: Option<Instant>,
        buf: &mut RecvBuf,
    ) -> Result<(), ServiceError> {
        let started = Instant::now();
        let end_until = deadline.unwrap_or(started + self.end_wait);
        let mut repeated = false;
        loop {
            let (channel, serving) = match self.ask() {
                Ask::Channel(c, serving) => (c, serving),
                Ask::Queued(rx) => {
                    let mut queued = Queued {
                        owner: self,
                        rx,
                        done: false,
                    };
                    let handed = match deadline {
                        Some(d) => {
                            let until = tokio::time::Instant::from_std(d);
                            match tokio::time::timeout_at(until, queued.handoff()).await {
                                Ok(h) => h,
                                Err(_) => return Err(ChannelError::TimedOut.into()),
                            }
                        }
                        None => queued.handoff().await,
                    };
                    match handed {
                        Handoff::Channel(c, serving) => (c, serving),
                        Handoff::Look => continue,
                    }
                }
                Ask::Empty => {
                    let (wait, no_end) = {
                        let pool = self.lock();
                        (pool.ends.end_wait(), pool.ends.no_end(started.elapsed()))
                    };
                    match wait {
                        Some((attachments, seen)) if Instant::now() < end_until => {
                            attachments.wait_generation_async(seen, end_until).await;
                            continue;
                        }
                        _ => return Err(no_end),
                    }
                }
            };
            let mut lease = Lease {
                owner: self,
                channel: Some(channel),
                serving,
            };
            let Some(channel) = lease.channel.as_mut() else {
                continue;
            };
            match call_on_async(channel, req, deadline, buf).await {
                Ok(()) => return Ok(()),
                Err(Attempt::Untaken) => lease.channel = None,
                Err(Attempt::Taken) => {
                    lease.channel = None;
                    drop(lease);
                    if self.retry == Retry::Idempotent && !repeated {
                        repeated = true;
                        continue;
                    }
                    return Err(self.lock().ends.lost());
                }
                Err(Attempt::Failed(e)) => {
                    if breaks_channel(&e) {
                        lease.channel = None;
                    }
                    return Err(e);
                }
            }
        }
    }

    /// [`call`](Self::call) with the deadline `now + timeout`.
    pub async fn call_timeout(
        &self,
        req: &Req,
        timeout: Duration,
    ) -> Result<AsyncReply<'_, Resp>, ServiceError> {
        self.call(req, Some(Instant::now() + timeout)).await
    }
}

impl ModuleContext {
    /// A blocking client of the imported service `name` that follows its
    /// exporter instances across restarts, releases and scaling
    /// ([`ServiceClient::follow`] on [`attachments`](Self::attachments)).
    /// One per import per instance: each new end goes to one client.
    pub fn import<Req: Wire, Resp: Wire>(
        &self,
        name: &str,
    ) -> Result<ServiceClient<Req, Resp>, ServiceError> {
        ServiceClient::follow(&self.attachments(), name)
    }

    /// The async counterpart of [`import`](Self::import) (feature
    /// `tokio`); must be called inside a tokio runtime. Share the client
    /// between tasks: it takes `&self`.
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
                // Clients with another exporter leave at their next call.
                self.server.set_draining();
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
    fn a_following_client_adopts_new_ends_and_spreads_calls_over_them() {
        let (c1, s1) = pair();
        let host = TestHost::new(vec![(GrantKind::Import, "svc", c1)]);
        let ctx = host.context();
        let mut client: ServiceClient<Ping, Ping> = ctx.import("svc").unwrap();
        let a = exporter(s1, "a");
        let r = client.call(&ping(1), None).unwrap();
        assert_eq!((r.n.to_native(), r.text.as_str()), (1, "a"));

        // A second replica: its end goes first, then calls alternate.
        let (c2, s2) = pair();
        let b = exporter(s2, "b");
        host.attach(GrantKind::Import, "svc", c2);
        let answered: Vec<String> = (2..8)
            .map(|n| client.call(&ping(n), None).unwrap().text.to_string())
            .collect();
        assert_eq!(answered, ["b", "a", "b", "a", "b", "a"]);
        assert_eq!((client.channels(), client.switches()), (2, 1));
        drop(client);
        assert_eq!((a.join().unwrap(), b.join().unwrap()), (4, 3));
    }

    #[test]
    fn a_call_goes_to_another_replica_when_its_exporter_died_before_taking_it() {
        let (c1, s1) = pair();
        let (c2, s2) = pair();
        let host = TestHost::new(vec![
            (GrantKind::Import, "svc", c1),
            (GrantKind::Import, "svc", c2),
        ]);
        let ctx = host.context();
        let mut client: ServiceClient<Ping, Ping> = ctx.import("svc").unwrap();
        assert_eq!(client.channels(), 2);
        let b = exporter(s2, "b");
        // The first channel's exporter opened its end and died, unnoticed
        // so far: the call is published there, found untaken, and sent to
        // the other.
        drop(ServerChannel::open(ServerEnd::from_fds(s1.memfd, s1.sock)).unwrap());
        for n in 0..4 {
            assert_eq!(client.call(&ping(n), None).unwrap().text.as_str(), "b");
        }
        assert_eq!(client.channels(), 1);
        drop(client);
        assert_eq!(b.join().unwrap(), 4);
    }

    #[test]
    fn a_client_leaves_a_draining_exporter_for_one_that_serves() {
        let (c1, s1) = pair();
        let (c2, s2) = pair();
        let importer = TestHost::new(vec![
            (GrantKind::Import, "svc", c1),
            (GrantKind::Import, "svc", c2),
        ]);
        let old_host = TestHost::new(vec![(GrantKind::Export, "svc", s1)]);
        let new_host = TestHost::new(vec![(GrantKind::Export, "svc", s2)]);
        // No quiet limit and a far deadline: only a leaving client ends
        // the old exporter's drain.
        let old = echo_server(old_host, Duration::from_secs(3600));
        let new = echo_server(new_host, Duration::from_secs(3600));
        let ctx = importer.context();
        let mut client: ServiceClient<Ping, Ping> = ctx.import("svc").unwrap();
        for n in 0..2 {
            assert_eq!(
                client.call(&ping(n), None).unwrap().text.as_str(),
                "serving"
            );
        }
        old_host.request_shutdown(Duration::from_secs(3600));
        // Calls go on (the old exporter answers what reaches it while
        // draining); the client drops its channel once it comes up next.
        while !old.is_finished() {
            let text = client.call(&ping(9), None).unwrap().text.to_string();
            assert!(text == "serving" || text == "draining", "{text}");
        }
        old.join().unwrap().unwrap();
        assert_eq!(client.channels(), 1);
        new_host.request_shutdown(Duration::from_secs(3600));
        drop(client);
        new.join().unwrap().unwrap();
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
    fn a_call_its_exporter_took_and_lost_is_repeated_only_if_idempotent() {
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
        assert!(matches!(e, ServiceError::Lost { .. }), "{e:?}");
        assert_eq!(
            crate::error_chain(&e),
            "the exporter of service `svc` went away with the request unanswered; it may have been processed"
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
        assert_eq!(r.text.as_str(), "late");
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
        // The old exporter waits for its client; the next call goes to the
        // new end, the one after drops the draining old one.
        assert_eq!(
            client.call(&ping(2), None).unwrap().text.as_str(),
            "serving"
        );
        assert_eq!(client.switches(), 1);
        assert_eq!(
            client.call(&ping(3), None).unwrap().text.as_str(),
            "serving"
        );
        old.join().unwrap().unwrap();
        assert_eq!(client.channels(), 1);
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
            let client: AsyncServiceClient<Ping, Ping> = ctx
                .import_async("svc")
                .unwrap()
                .with_retry(Retry::Idempotent);
            let old = exporter(s1, "old");
            let r = client.call_timeout(&ping(1), Duration::from_secs(30)).await;
            assert_eq!(r.unwrap().text.as_str(), "old");

            // A new end: the next call goes to it.
            let (c2, s2) = pair();
            let new = exporter(s2, "new");
            host.attach(GrantKind::Import, "svc", c2);
            let r = client.call(&ping(2), None).await.unwrap();
            assert_eq!(r.text.as_str(), "new");
            drop(r);
            assert_eq!(client.switches(), 1);

            // Both exporters go away; the next end's exporter dies holding
            // the request, which is repeated on the end attached meanwhile.
            drop(client);
            assert_eq!(old.join().unwrap(), 1);
            assert_eq!(new.join().unwrap(), 1);
            let (c1, s1) = pair();
            let host = TestHost::new(vec![(GrantKind::Import, "svc", c1)]);
            let ctx = host.context();
            let client: AsyncServiceClient<Ping, Ping> = ctx
                .import_async("svc")
                .unwrap()
                .with_retry(Retry::Idempotent);
            let (c2, s2) = pair();
            let last = exporter(s2, "last");
            dies_mid_request(s1, move || host.attach(GrantKind::Import, "svc", c2));
            let deadline = Instant::now() + Duration::from_secs(30);
            let r = client.call(&ping(3), Some(deadline)).await;
            assert_eq!(r.unwrap().text.as_str(), "last");
            drop(client);
            assert_eq!(last.join().unwrap(), 1);
        });
    }

    /// An exporter whose handler holds each request until `gate` says go,
    /// after telling `arrived`.
    #[cfg(feature = "tokio")]
    fn gated_exporter(
        end: ChannelFds,
        tag: &'static str,
        arrived: std::sync::mpsc::Sender<&'static str>,
        gate: std::sync::mpsc::Receiver<()>,
    ) -> std::thread::JoinHandle<u32> {
        std::thread::spawn(move || {
            let mut ch = ServerChannel::open(ServerEnd::from_fds(end.memfd, end.sock)).unwrap();
            let mut served = 0;
            let mut buf = RecvBuf::default();
            loop {
                let r = ch.serve_next(None, |req, w| {
                    arrived.send(tag).map_err(|e| e.to_string())?;
                    gate.recv_timeout(Duration::from_secs(30))
                        .map_err(|e| e.to_string())?;
                    wire::answer::<Ping, Ping>(&mut buf, req, w, &mut |p| ping(p.n.to_native()))
                });
                match r {
                    Ok(()) => served += 1,
                    Err(ChannelError::PeerGone) => return served,
                    Err(e) => panic!("exporter {tag}: {e}"),
                }
            }
        })
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn concurrent_async_calls_go_out_on_different_channels() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (c1, s1) = pair();
        let (c2, s2) = pair();
        let (arrived, at) = std::sync::mpsc::channel();
        let (go_a, gate_a) = std::sync::mpsc::channel();
        let (go_b, gate_b) = std::sync::mpsc::channel();
        let a = gated_exporter(s1, "a", arrived.clone(), gate_a);
        let b = gated_exporter(s2, "b", arrived, gate_b);
        rt.block_on(async {
            let client =
                std::sync::Arc::new(AsyncServiceClient::<Ping, Ping>::open_all([c1, c2]).unwrap());
            let calls: Vec<_> = (0..2)
                .map(|n| {
                    let client = client.clone();
                    tokio::spawn(async move {
                        let d = Instant::now() + Duration::from_secs(30);
                        client.call(&ping(n), Some(d)).await.map(|r| r.n)
                    })
                })
                .collect();
            // Both requests are held by their exporters at the same time:
            // one went to each channel.
            let mut held = tokio::task::spawn_blocking(move || {
                let first = at.recv_timeout(Duration::from_secs(30)).unwrap();
                let second = at.recv_timeout(Duration::from_secs(30)).unwrap();
                vec![first, second]
            })
            .await
            .unwrap();
            held.sort_unstable();
            assert_eq!(held, ["a", "b"]);
            go_a.send(()).unwrap();
            go_b.send(()).unwrap();
            let mut ns = Vec::new();
            for c in calls {
                ns.push(c.await.unwrap().unwrap());
            }
            ns.sort_unstable();
            assert_eq!(ns, [0, 1]);
        });
        assert_eq!((a.join().unwrap(), b.join().unwrap()), (1, 1));
    }

    #[cfg(feature = "tokio")]
    #[test]
    fn calls_queue_for_a_busy_channel_and_one_giving_up_loses_nothing() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let (c, s) = pair();
        let (arrived, at) = std::sync::mpsc::channel();
        let (go, gate) = std::sync::mpsc::channel();
        let a = gated_exporter(s, "a", arrived, gate);
        rt.block_on(async {
            let client = std::sync::Arc::new(AsyncServiceClient::<Ping, Ping>::open(c).unwrap());
            let first = {
                let client = client.clone();
                tokio::spawn(async move { client.call(&ping(1), None).await.map(|r| r.n) })
            };
            let held = tokio::task::spawn_blocking(move || {
                let tag = at.recv_timeout(Duration::from_secs(30)).unwrap();
                (tag, at)
            });
            let (tag, at) = held.await.unwrap();
            assert_eq!(tag, "a");
            // The one channel is busy: this call queues, and gives up.
            let e = client
                .call(&ping(2), Some(Instant::now() + Duration::from_millis(50)))
                .await
                .unwrap_err();
            assert!(e.is_timeout(), "{e:?}");
            // Three more queue behind the first; each gets the channel in
            // turn once it is released.
            let rest: Vec<_> = (3..6)
                .map(|n| {
                    let client = client.clone();
                    tokio::spawn(async move { client.call(&ping(n), None).await.map(|r| r.n) })
                })
                .collect();
            tokio::task::yield_now().await;
            let releaser = tokio::task::spawn_blocking(move || {
                for _ in 0..4 {
                    go.send(()).unwrap();
                }
                // Each request arrives after the one before was answered.
                for _ in 0..3 {
                    at.recv_timeout(Duration::from_secs(30)).unwrap();
                }
            });
            assert_eq!(first.await.unwrap().unwrap(), 1);
            let mut ns = Vec::new();
            for t in rest {
                ns.push(t.await.unwrap().unwrap());
            }
            ns.sort_unstable();
            assert_eq!(ns, [3, 4, 5]);
            releaser.await.unwrap();
            assert_eq!(client.channels(), 1);
        });
        assert_eq!(a.join().unwrap(), 4);
    }

    #[test]
    fn errors_render_their_cause_chain() {
        let e = ServiceError::from(ChannelError::PeerGone);
        assert_eq!(
            crate::error_chain(&e),
            "service channel failed: peer is gone"
        );
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
        let id = wire::send(client.ends.front().unwrap(), &ping(1000), None).unwrap();
        assert!(serve(&mut ch));
        let mut rbuf = RecvBuf::default();
        let e = wire::recv_into(client.ends.front().unwrap(), id, None, &mut rbuf).unwrap_err();
        assert!(
            matches!(&e, ChannelError::Remote(m) if m.contains("exceeds the slot capacity, 256 bytes")),
            "{e}"
        );
        let id = wire::send(client.ends.front().unwrap(), &ping(3), None).unwrap();
        assert!(serve(&mut ch));
        wire::recv_into(client.ends.front().unwrap(), id, None, &mut rbuf).unwrap();
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
