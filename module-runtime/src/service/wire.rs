//! The typed data path of one channel: how a request or reply goes from a
//! value into a slot and from a slot to the code that reads it.
//!
//! - **Sending** serializes the value once, with rkyv, straight into the
//!   loaned slot ([`SlotSink`]): no intermediate buffer. A value larger
//!   than the slot is [`ServiceError::TooLarge`], and nothing is sent.
//! - **Receiving** copies the message out of shared memory once, into a
//!   private aligned buffer the receiver keeps and reuses ([`RecvBuf`]),
//!   then validates it in place (rkyv's checked `access`, i.e. bytecheck)
//!   and hands out a reference into that buffer: no deserialization. The
//!   copy is what the distrust model asks for: the peer can rewrite shared
//!   memory at any time, so what was validated must be private.
//!
//! The functions here take one channel each; which channel a call goes to
//! is the clients' business (`service.rs`).

use std::ops::Deref;
use std::time::Instant;

use rkyv::api::high::{HighSerializer, HighValidator};
use rkyv::bytecheck::CheckBytes;
use rkyv::de::Pool;
use rkyv::rancor::{self, Source, Strategy};
use rkyv::ser::allocator::ArenaHandle;
use rkyv::ser::{Positional, Writer};
use rkyv::util::AlignedVec;
use shm_ipc::channel::{ChannelError, Client};
use shm_ipc::{ShmSlice, SlotWriter};

use super::ServiceError;

/// A type that travels over a service: archived with rkyv straight into a
/// slot, validated on receipt and read in place as its archived form
/// ([`rkyv::Archived<T>`]).
///
/// Implemented for every type that derives `rkyv::Archive`,
/// `rkyv::Serialize` and `rkyv::Deserialize` with rkyv 0.8 and its
/// `bytecheck` feature on (which makes archives checkable): module authors
/// never implement it by hand.
pub trait Wire: rkyv::Archive + Sized {
    /// Serializes `self` into a loaned slot, in place. A value that does not
    /// fit is [`ServiceError::TooLarge`] (with its whole size); the slot's
    /// contents are then unspecified and must not be sent.
    fn encode_into(&self, slot: &mut SlotWriter<'_>) -> Result<(), ServiceError>;

    /// Validates an archive of `Self` (bytecheck) and returns its root. The
    /// bytes must be private (not shared memory) and aligned to 16.
    fn access_archived(bytes: &[u8]) -> Result<&Self::Archived, rancor::Error>;

    /// Deserializes a validated archive into an owned value.
    fn decode(archived: &Self::Archived) -> Result<Self, rancor::Error>;
}

impl<T> Wire for T
where
    T: rkyv::Archive
        + for<'a, 'w, 's> rkyv::Serialize<
            HighSerializer<SlotSink<'w, 's>, ArenaHandle<'a>, rancor::Error>,
        >,
    T::Archived: for<'a> CheckBytes<HighValidator<'a, rancor::Error>>
        + rkyv::Deserialize<T, Strategy<Pool, rancor::Error>>,
{
    fn encode_into(&self, slot: &mut SlotWriter<'_>) -> Result<(), ServiceError> {
        let capacity = slot.capacity();
        let sink = rkyv::api::high::to_bytes_in::<_, rancor::Error>(self, SlotSink::new(slot))
            .map_err(ServiceError::Codec)?;
        if sink.overflowed {
            return Err(ServiceError::TooLarge {
                needed: sink.pos,
                capacity,
            });
        }
        Ok(())
    }

    fn access_archived(bytes: &[u8]) -> Result<&Self::Archived, rancor::Error> {
        rkyv::access::<T::Archived, rancor::Error>(bytes)
    }

    fn decode(archived: &Self::Archived) -> Result<Self, rancor::Error> {
        rkyv::deserialize::<T, rancor::Error>(archived)
    }
}

/// The rkyv writer [`Wire::encode_into`] serializes through: it appends to
/// a loaned slot. Past the slot's capacity it stops writing and only counts,
/// so the error can say how large the message would have been.
#[derive(Debug)]
pub struct SlotSink<'w, 's> {
    slot: &'w mut SlotWriter<'s>,
    pos: usize,
    overflowed: bool,
}

impl<'w, 's> SlotSink<'w, 's> {
    /// A writer appending to `slot` (which must be empty: archive positions
    /// count from the start of the message).
    pub fn new(slot: &'w mut SlotWriter<'s>) -> Self {
        debug_assert!(slot.is_empty());
        Self {
            pos: slot.len(),
            slot,
            overflowed: false,
        }
    }
}

impl Positional for SlotSink<'_, '_> {
    fn pos(&self) -> usize {
        self.pos
    }
}

impl<E: Source> Writer<E> for SlotSink<'_, '_> {
    fn write(&mut self, bytes: &[u8]) -> Result<(), E> {
        if !self.overflowed && self.slot.write(bytes).is_err() {
            self.overflowed = true;
        }
        self.pos += bytes.len();
        Ok(())
    }
}

/// A receiver's private copy of the last message: an aligned buffer that
/// grows to the largest message seen (at most the channel's slot capacity)
/// and is reused for every message after.
#[derive(Debug, Default)]
pub(crate) struct RecvBuf {
    bytes: AlignedVec,
    len: usize,
}

impl RecvBuf {
    /// Copies `msg` out of shared memory, once.
    pub(crate) fn copy_from(&mut self, msg: ShmSlice<'_>) {
        let len = msg.len();
        if self.bytes.len() < len {
            self.bytes.resize(len, 0);
        }
        msg.copy_to(&mut self.bytes[..len]);
        self.len = len;
    }

    /// Bytes allocated for copies.
    #[cfg(test)]
    pub(crate) fn allocated(&self) -> usize {
        self.bytes.capacity()
    }

    /// Validates the copy as an archive of `T` and returns its root, which
    /// borrows this buffer.
    pub(crate) fn access<T: Wire>(&self) -> Result<&T::Archived, rancor::Error> {
        T::access_archived(&self.bytes[..self.len])
    }
}

/// A validated reply of the async client, read in place in a receive
/// buffer it owns; derefs to the archived response. Dropping it gives the
/// buffer back to its client for the next call;
/// [`deserialize`](Self::deserialize) makes an owned copy that outlives it.
#[cfg(feature = "tokio")]
pub struct AsyncReply<'a, T: Wire> {
    /// The root `T::access_archived` returned for `buf`'s bytes; valid
    /// while `buf` is held (see `Deref`).
    root: std::ptr::NonNull<T::Archived>,
    /// Holds the reply's bytes; never changed or moved out while held.
    buf: Option<RecvBuf>,
    home: &'a std::sync::Mutex<Vec<RecvBuf>>,
}

// SAFETY: an `AsyncReply` is an owned byte buffer plus what amounts to a
// shared reference into it (`root`); sending it to another thread is
// sending a `&T::Archived` along with its backing store, sound when
// `T::Archived: Sync`. `home` is a `&Mutex`, which is Send and Sync.
#[cfg(feature = "tokio")]
unsafe impl<T: Wire> Send for AsyncReply<'_, T> where T::Archived: Sync {}
// SAFETY: sharing an `AsyncReply` only gives out `&T::Archived` (through
// `Deref`), sound when `T::Archived: Sync`.
#[cfg(feature = "tokio")]
unsafe impl<T: Wire> Sync for AsyncReply<'_, T> where T::Archived: Sync {}

#[cfg(feature = "tokio")]
impl<'a, T: Wire> AsyncReply<'a, T> {
    /// Validates `buf` as an archive of `T` and keeps the root it found;
    /// on failure the buffer goes home at once.
    pub(crate) fn new(
        buf: RecvBuf,
        home: &'a std::sync::Mutex<Vec<RecvBuf>>,
    ) -> Result<Self, ServiceError> {
        let root = match T::access_archived(&buf.bytes[..buf.len]) {
            Ok(root) => std::ptr::NonNull::from(root),
            Err(e) => {
                give_home(home, buf);
                return Err(ServiceError::Codec(e));
            }
        };
        Ok(Self {
            root,
            buf: Some(buf),
            home,
        })
    }

    /// Deserializes the archived response into an owned value.
    pub fn deserialize(&self) -> Result<T, ServiceError> {
        T::decode(self).map_err(ServiceError::Codec)
    }
}

#[cfg(feature = "tokio")]
fn give_home(home: &std::sync::Mutex<Vec<RecvBuf>>, buf: RecvBuf) {
    let mut home = home.lock().unwrap_or_else(|p| p.into_inner());
    // Enough for the calls a client typically has in flight.
    if home.len() < 64 {
        home.push(buf);
    }
}

#[cfg(feature = "tokio")]
impl<T: Wire> Deref for AsyncReply<'_, T> {
    type Target = T::Archived;

    fn deref(&self) -> &T::Archived {
        // SAFETY: `root` is the reference `T::access_archived` returned,
        // borrowing `buf`'s bytes (or data that lives longer). Those bytes
        // live in the buffer's heap allocation, which did not move when the
        // `RecvBuf` did, and are neither changed nor freed while this reply
        // holds `buf` (nothing here writes it; `Drop` gives it away last).
        // No trust in `Wire`'s implementation is needed: whatever reference
        // it returned stays valid as long as the bytes it borrowed.
        unsafe { self.root.as_ref() }
    }
}

#[cfg(feature = "tokio")]
impl<T: Wire> Drop for AsyncReply<'_, T> {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            give_home(self.home, buf);
        }
    }
}

#[cfg(feature = "tokio")]
impl<T: Wire> std::fmt::Debug for AsyncReply<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AsyncReply<{}>", std::any::type_name::<T>())
    }
}

/// A validated reply, read in place in the client's receive buffer; derefs
/// to the archived response. The client cannot make another call while it
/// is held; [`deserialize`](Self::deserialize) makes an owned copy that
/// outlives it.
pub struct Reply<'a, T: Wire> {
    archived: &'a T::Archived,
}

impl<'a, T: Wire> Reply<'a, T> {
    pub(crate) fn new(archived: &'a T::Archived) -> Self {
        Self { archived }
    }

    /// The archived response (also reachable through `Deref`).
    pub fn archived(&self) -> &'a T::Archived {
        self.archived
    }

    /// Deserializes the reply into an owned value.
    pub fn deserialize(&self) -> Result<T, ServiceError> {
        T::decode(self.archived).map_err(ServiceError::Codec)
    }
}

impl<T: Wire> Deref for Reply<'_, T> {
    type Target = T::Archived;

    fn deref(&self) -> &T::Archived {
        self.archived
    }
}

impl<T: Wire> std::fmt::Debug for Reply<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Reply<{}>", std::any::type_name::<T>())
    }
}

/// Serializes `req` straight into a request slot of `client` and publishes
/// it; returns the request's id. An error means nothing was sent.
pub(crate) fn send<Req: Wire>(
    client: &mut Client,
    req: &Req,
    deadline: Option<Instant>,
) -> Result<u64, ServiceError> {
    client.send_in_place(deadline, |w| req.encode_into(w))
}

/// Waits for the reply to request `id` on `client` and copies it into
/// `buf` (validate it with [`RecvBuf::access`]).
pub(crate) fn recv_into(
    client: &mut Client,
    id: u64,
    deadline: Option<Instant>,
    buf: &mut RecvBuf,
) -> Result<(), ChannelError> {
    client.recv_reply(id, deadline, |msg| buf.copy_from(msg))
}

/// [`send`] on an async client.
#[cfg(feature = "tokio")]
pub(crate) async fn send_async<Req: Wire>(
    client: &mut shm_ipc::channel::AsyncClient,
    req: &Req,
) -> Result<u64, ServiceError> {
    client.send_in_place(|w| req.encode_into(w)).await
}

/// [`recv_into`] on an async client.
#[cfg(feature = "tokio")]
pub(crate) async fn recv_into_async(
    client: &mut shm_ipc::channel::AsyncClient,
    id: u64,
    buf: &mut RecvBuf,
) -> Result<(), ChannelError> {
    client.recv_reply(id, |msg| buf.copy_from(msg)).await
}

/// The server's side of one request: copies it into `buf`, validates it,
/// runs `handler` on the archived request and serializes its response
/// straight into the reply slot. A request that fails validation, or a
/// response that cannot be encoded, is answered with an error message.
pub(crate) fn answer<Req: Wire, Resp: Wire>(
    buf: &mut RecvBuf,
    req: ShmSlice<'_>,
    reply: &mut SlotWriter<'_>,
    handler: &mut impl FnMut(&Req::Archived) -> Resp,
) -> Result<(), String> {
    buf.copy_from(req);
    let req = buf
        .access::<Req>()
        .map_err(|e| format!("invalid request: {e}"))?;
    handler(req).encode_into(reply).map_err(|e| match e {
        ServiceError::TooLarge { needed, capacity } => {
            format!("reply of {needed} bytes exceeds the slot capacity, {capacity} bytes")
        }
        ServiceError::Codec(e) => format!("cannot encode reply: {e}"),
        other => format!("cannot encode reply: {other}"),
    })
}
