//! Request/response channels between exactly two processes.
//!
//! One memfd segment per channel holds a header, two rings (client → server
//! requests, server → client replies) and their fixed-size slots; each slot
//! carries a small header and up to `slot_capacity` payload bytes, written
//! and read in place. A Unix socketpair carries wake-ups and tells each side
//! when the other is gone. The byte layout is specified in
//! `docs/shm-layout.md`.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::fcntl::{fcntl, FcntlArg, OFlag};

use crate::bytes::{ShmSlice, SlotFull, SlotWriter};
use crate::doorbell::{self, Drained};
use crate::region::Region;
use crate::ring::{Consumer, Corrupt, Producer, RingWords};
use crate::segment::{self, SegmentError, BASE_SEALS};
use crate::sync::AtomicU32;

pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"EMBRCHN1");
pub(crate) const LAYOUT_VERSION: u32 = 1;
const H_MAGIC: usize = 0;
const H_VERSION: usize = 8;
const H_SLOTS: usize = 12;
const H_CAPACITY: usize = 16;
const H_READY: usize = 20;
/// Server state flags (`SERVER_*`), written by the server only.
const H_SERVER: usize = 24;
/// Id of the last request the server began to handle, on its own line.
const H_CLAIMED: usize = 64;
const RING_CTRL: [usize; 2] = [128, 384];
const R_HEAD: usize = 0;
const R_TAIL: usize = 64;
const R_CPARK: usize = 128;
const R_PPARK: usize = 192;
const SLOTS_BASE: usize = 4096;
const SLOT_HEADER: usize = 64;
const S_LEN: usize = 0;
const S_STATUS: usize = 4;
const S_ID: usize = 8;
/// Polls a waiter makes before it first reads the clock.
const QUICK_POLLS: u32 = 64;
/// What a quick poll is counted as, in ns.
const QUICK_POLL_NS: u64 = 20;
/// Polls between two `pause` instructions while spinning (a `pause` costs
/// ~35 ns on this project's AMD EPYC guests).
pub(crate) const POLLS_PER_PAUSE: u32 = 4;
/// Payload bytes a receiver asks for while it reads a slot's header.
const PREFETCH: usize = 128;
const REQUESTS: usize = 0;
const REPLIES: usize = 1;

/// Most slots a ring may have.
pub const MAX_SLOTS: u32 = 4096;
/// Largest payload a slot may hold.
pub const MAX_SLOT_CAPACITY: u32 = 256 << 20;

/// Reply status: the handler succeeded; the payload is its reply.
const STATUS_OK: u32 = 0;
/// Reply status: the handler failed; the payload is a UTF-8 message.
const STATUS_ERROR: u32 = 1;

/// Server flag: the server records in `claimed` each request it takes, so
/// a client can tell a request its dead server never took.
const SERVER_CLAIMS: u32 = 1;
/// Server flag: the server is draining (shutting down): clients with
/// another server should move there.
const SERVER_DRAINING: u32 = 2;

/// Shape of a channel: slots per direction and bytes per slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelConfig {
    /// Slots in each ring; a power of two in `1..=MAX_SLOTS`. This is how many
    /// requests a client may have queued.
    pub slots: u32,
    /// Payload bytes per slot (rounded up to 64): the largest message.
    pub slot_capacity: u32,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        Self {
            slots: 16,
            slot_capacity: 4096,
        }
    }
}

/// How long an endpoint spins before it parks.
///
/// Parking costs a wake-up through the kernel (tens of microseconds on a
/// virtual machine), so a waiter first busy-waits for a while. The spin
/// yields the CPU now and then, so a peer on the same core still runs, and it
/// is bounded, so an idle channel burns no CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WaitStrategy {
    /// Busy-wait at least this long before parking. Zero (with
    /// `adaptive_max` zero) parks at once.
    pub spin: Duration,
    /// Adaptive spinning: an endpoint keeps a moving average of how long its
    /// waits take and, while twice that average is at most `adaptive_max`,
    /// spins that long instead, so a peer that answers in 100 µs is caught
    /// spinning rather than paying for a wake-up; waits longer than that
    /// park after `spin`. Zero disables it.
    pub adaptive_max: Duration,
}

impl WaitStrategy {
    /// Park at once, never spin: lowest CPU use, highest latency.
    pub const PARK: Self = Self {
        spin: Duration::ZERO,
        adaptive_max: Duration::ZERO,
    };

    pub(crate) fn budget(&self, avg_wait: Duration) -> Duration {
        let adaptive = avg_wait * 2;
        if !self.adaptive_max.is_zero() && adaptive <= self.adaptive_max {
            self.spin.max(adaptive)
        } else {
            self.spin
        }
    }
}

impl Default for WaitStrategy {
    fn default() -> Self {
        Self {
            spin: Duration::from_micros(50),
            adaptive_max: Duration::from_millis(1),
        }
    }
}

/// Errors on a channel.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The segment could not be created, or is not a valid channel.
    #[error("channel segment")]
    Segment(#[from] SegmentError),
    /// The configuration is out of range.
    #[error("invalid channel config: {0}")]
    Config(&'static str),
    /// The peer wrote something no correct peer could (an index or length
    /// out of range). The channel is unusable.
    #[error("peer corrupted the channel: {0}")]
    Corrupt(&'static str),
    /// The peer closed its end or died.
    #[error("peer is gone")]
    PeerGone,
    /// The ring is full and the caller did not want to wait.
    #[error("ring is full")]
    Full,
    /// The deadline passed before the peer answered or made room.
    #[error("deadline passed")]
    TimedOut,
    /// The message does not fit a slot.
    #[error(transparent)]
    TooLarge(#[from] SlotFull),
    /// The server's handler failed and said why.
    #[error("remote handler failed: {0}")]
    Remote(String),
    /// A system call failed.
    #[error("{op} failed")]
    Os {
        /// What was being done.
        op: &'static str,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

impl ChannelError {
    fn os(op: &'static str, e: impl Into<std::io::Error>) -> Self {
        Self::Os {
            op,
            source: e.into(),
        }
    }
}

/// Sizes of a channel, read once from the header and validated.
#[derive(Debug, Clone, Copy)]
struct Layout {
    slots: u32,
    capacity: usize,
}

impl Layout {
    fn new(slots: u32, capacity: u32) -> Result<Self, &'static str> {
        if slots == 0 || !slots.is_power_of_two() || slots > MAX_SLOTS {
            return Err("slots must be a power of two in 1..=4096");
        }
        if capacity == 0 || capacity > MAX_SLOT_CAPACITY || capacity % 64 != 0 {
            return Err("slot capacity must be a multiple of 64 in 64..=256 MiB");
        }
        Ok(Self {
            slots,
            capacity: capacity as usize,
        })
    }

    fn stride(&self) -> usize {
        SLOT_HEADER + self.capacity
    }

    fn total(&self) -> usize {
        let raw = SLOTS_BASE + 2 * self.slots as usize * self.stride();
        raw.div_ceil(4096) * 4096
    }

    fn slot(&self, ring: usize, idx: u32) -> usize {
        SLOTS_BASE + (ring * self.slots as usize + idx as usize) * self.stride()
    }
}

/// One ring's control words inside a mapped channel.
struct RingAt<'a> {
    region: &'a Region,
    base: usize,
}

impl RingWords for RingAt<'_> {
    fn head(&self) -> &AtomicU32 {
        self.region.u32_at(self.base + R_HEAD)
    }
    fn tail(&self) -> &AtomicU32 {
        self.region.u32_at(self.base + R_TAIL)
    }
    fn consumer_parked(&self) -> &AtomicU32 {
        self.region.u32_at(self.base + R_CPARK)
    }
    fn producer_parked(&self) -> &AtomicU32 {
        self.region.u32_at(self.base + R_PPARK)
    }
}

macro_rules! end_type {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        ///
        /// It only holds the two descriptors (the segment and this side's
        /// doorbell socket), so it can be passed to another process with
        /// [`crate::fdpass`] and opened there.
        #[derive(Debug)]
        pub struct $name {
            memfd: OwnedFd,
            sock: OwnedFd,
        }

        impl $name {
            /// Wraps descriptors received from another process. They are
            /// validated when the end is opened.
            pub fn from_fds(memfd: OwnedFd, sock: OwnedFd) -> Self {
                Self { memfd, sock }
            }

            /// The segment and doorbell descriptors, in that order.
            pub fn into_fds(self) -> (OwnedFd, OwnedFd) {
                (self.memfd, self.sock)
            }

            /// Borrows both descriptors, e.g. to send them.
            pub fn fds(&self) -> [BorrowedFd<'_>; 2] {
                [self.memfd.as_fd(), self.sock.as_fd()]
            }
        }
    };
}

end_type!(ClientEnd, "The client's unopened end of a channel.");
end_type!(ServerEnd, "The server's unopened end of a channel.");

/// Creates a channel: one sealed, pre-faulted segment and a doorbell
/// socketpair. Hand the ends to the two processes that will use them (the
/// creator should keep neither, or peer death cannot be detected).
pub fn channel_pair(config: &ChannelConfig) -> Result<(ClientEnd, ServerEnd), ChannelError> {
    let capacity = config
        .slot_capacity
        .checked_next_multiple_of(64)
        .ok_or(ChannelError::Config("slot capacity too large"))?;
    let layout = Layout::new(config.slots, capacity).map_err(ChannelError::Config)?;
    let total = layout.total();
    let memfd = segment::create_memfd(c"ember-channel", total as u64)?;
    segment::add_seals(memfd.as_fd(), BASE_SEALS)?;
    let region = Region::map_rw(&memfd, total).map_err(|e| SegmentError::os("mmap", e))?;
    region.u64_at(H_MAGIC).store(MAGIC, Ordering::Relaxed);
    region
        .u32_at(H_VERSION)
        .store(LAYOUT_VERSION, Ordering::Relaxed);
    region
        .u32_at(H_SLOTS)
        .store(layout.slots, Ordering::Relaxed);
    region.u32_at(H_CAPACITY).store(capacity, Ordering::Relaxed);
    // Release: pairs with the Acquire in `Endpoint::open`; everything above
    // is visible to whoever sees `ready == 1`.
    region.u32_at(H_READY).store(1, Ordering::Release);
    drop(region);
    let (a, b) = crate::fdpass::stream_pair().map_err(|e| ChannelError::os("socketpair", e))?;
    let memfd2 = memfd.try_clone().map_err(|e| ChannelError::os("dup", e))?;
    Ok((
        ClientEnd { memfd, sock: a },
        ServerEnd {
            memfd: memfd2,
            sock: b,
        },
    ))
}

/// What both sides share: the mapping, the rings' private state, the doorbell.
#[derive(Debug)]
struct Endpoint {
    region: Region,
    layout: Layout,
    sock: OwnedFd,
    tx_ring: usize,
    tx: Producer,
    rx: Consumer,
    peer_gone: bool,
    wait: WaitStrategy,
    /// Moving average (1/8 weight) of recent wait durations, in ns.
    avg_wait_ns: u64,
}

/// A message header read once from a slot and checked.
#[derive(Debug, Clone, Copy)]
struct SlotHeader {
    len: usize,
    status: u32,
    id: u64,
}

impl Endpoint {
    fn open(memfd: OwnedFd, sock: OwnedFd, tx_ring: usize) -> Result<Self, ChannelError> {
        let size = segment::check_sealed(&memfd, BASE_SEALS)?;
        if size < SLOTS_BASE as u64 || size > usize::MAX as u64 {
            return Err(SegmentError::BadSize {
                actual: size,
                reason: "smaller than a channel header",
            }
            .into());
        }
        let region =
            Region::map_rw(&memfd, size as usize).map_err(|e| SegmentError::os("mmap", e))?;
        // Acquire: pairs with the Release in `channel_pair`.
        if region.u32_at(H_READY).load(Ordering::Acquire) != 1 {
            return Err(SegmentError::BadHeader("channel not initialized").into());
        }
        if region.u64_at(H_MAGIC).load(Ordering::Relaxed) != MAGIC {
            return Err(SegmentError::BadHeader("not a channel segment (bad magic)").into());
        }
        if region.u32_at(H_VERSION).load(Ordering::Relaxed) != LAYOUT_VERSION {
            return Err(SegmentError::BadHeader("unsupported channel layout version").into());
        }
        let slots = region.u32_at(H_SLOTS).load(Ordering::Relaxed);
        let capacity = region.u32_at(H_CAPACITY).load(Ordering::Relaxed);
        let layout = Layout::new(slots, capacity).map_err(SegmentError::BadHeader)?;
        if layout.total() as u64 > size {
            return Err(SegmentError::BadSize {
                actual: size,
                reason: "smaller than its header's layout",
            }
            .into());
        }
        // The doorbell stays in blocking mode: a park without deadline is
        // one blocking read; every other operation passes MSG_DONTWAIT.
        let flags =
            fcntl(&sock, FcntlArg::F_GETFL).map_err(|e| ChannelError::os("fcntl(F_GETFL)", e))?;
        fcntl(
            &sock,
            FcntlArg::F_SETFL(OFlag::from_bits_retain(flags) & !OFlag::O_NONBLOCK),
        )
        .map_err(|e| ChannelError::os("fcntl(F_SETFL)", e))?;
        drop(memfd);
        Ok(Self {
            region,
            layout,
            sock,
            tx_ring,
            tx: Producer::new(slots),
            rx: Consumer::new(slots),
            peer_gone: false,
            wait: WaitStrategy::default(),
            avg_wait_ns: 0,
        })
    }

    fn ring(&self, which: usize) -> RingAt<'_> {
        RingAt {
            region: &self.region,
            base: RING_CTRL[which],
        }
    }

    fn tx_words(&self) -> RingAt<'_> {
        self.ring(self.tx_ring)
    }

    fn rx_words(&self) -> RingAt<'_> {
        self.ring(1 - self.tx_ring)
    }

    fn corrupt(_: Corrupt) -> ChannelError {
        ChannelError::Corrupt("ring index out of range")
    }

    fn try_reserve(&mut self) -> Result<Option<u32>, ChannelError> {
        let w = RingAt {
            region: &self.region,
            base: RING_CTRL[self.tx_ring],
        };
        self.tx.reserve(&w).map_err(Self::corrupt)
    }

    fn try_peek(&mut self) -> Result<Option<u32>, ChannelError> {
        let w = RingAt {
            region: &self.region,
            base: RING_CTRL[1 - self.tx_ring],
        };
        self.rx.peek(&w).map_err(Self::corrupt)
    }

    /// Drains the doorbell after a wake-up; notes a gone peer.
    fn drain(&mut self) -> Result<(), ChannelError> {
        if doorbell::drain(self.sock.as_fd()).map_err(|e| ChannelError::os("recv(doorbell)", e))?
            == Drained::PeerGone
        {
            self.peer_gone = true;
        }
        Ok(())
    }

    /// Spins, then parks, until `ready` yields a slot.
    fn wait_for(
        &mut self,
        deadline: Option<Instant>,
        mut ready: impl FnMut(&mut Self) -> Result<Option<u32>, ChannelError>,
        park: impl FnMut(&mut Self) -> Result<Option<u32>, ChannelError>,
        unpark: impl Fn(&Self),
    ) -> Result<u32, ChannelError> {
        if let Some(slot) = ready(self)? {
            return Ok(slot);
        }
        // A short wait is counted, not timed: reading the clock costs as
        // much as several polls, and the one after the slot came would
        // delay the caller.
        if !self
            .wait
            .budget(Duration::from_nanos(self.avg_wait_ns))
            .is_zero()
            && !self.peer_gone
        {
            for i in 0..QUICK_POLLS {
                if i % POLLS_PER_PAUSE == 0 {
                    std::hint::spin_loop();
                }
                if let Some(slot) = ready(self)? {
                    self.note_wait(u64::from(i + 1) * QUICK_POLL_NS);
                    return Ok(slot);
                }
            }
        }
        let start = Instant::now();
        let out = self.spin_then_park(start, deadline, &mut ready, park, unpark);
        let took = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.note_wait(took + u64::from(QUICK_POLLS) * QUICK_POLL_NS);
        out
    }

    /// Keeps the moving average (1/8 weight) of wait durations.
    fn note_wait(&mut self, took_ns: u64) {
        self.avg_wait_ns = self.avg_wait_ns - self.avg_wait_ns / 8 + took_ns / 8;
    }

    fn spin_then_park(
        &mut self,
        start: Instant,
        deadline: Option<Instant>,
        ready: &mut impl FnMut(&mut Self) -> Result<Option<u32>, ChannelError>,
        mut park: impl FnMut(&mut Self) -> Result<Option<u32>, ChannelError>,
        unpark: impl Fn(&Self),
    ) -> Result<u32, ChannelError> {
        let budget = self.wait.budget(Duration::from_nanos(self.avg_wait_ns));
        if !budget.is_zero() && !self.peer_gone {
            let mut i: u32 = 0;
            loop {
                if i % POLLS_PER_PAUSE == 0 {
                    std::hint::spin_loop();
                }
                if let Some(slot) = ready(self)? {
                    return Ok(slot);
                }
                i = i.wrapping_add(1);
                if i % 64 == 0 {
                    let spun = start.elapsed();
                    if spun >= budget || deadline.is_some_and(|d| Instant::now() >= d) {
                        break;
                    }
                    if i % 1024 == 0 {
                        std::thread::yield_now();
                    }
                }
            }
        }
        loop {
            if self.peer_gone {
                return match ready(self)? {
                    Some(slot) => Ok(slot),
                    None => Err(ChannelError::PeerGone),
                };
            }
            if let Some(slot) = park(self)? {
                return Ok(slot);
            }
            let woke = match deadline {
                // No deadline: one blocking read is both the wait and the drain.
                None => {
                    let alive = doorbell::wait_and_drain(self.sock.as_fd())
                        .map_err(|e| ChannelError::os("recv(doorbell)", e))?;
                    if alive == Drained::PeerGone {
                        self.peer_gone = true;
                    }
                    unpark(self);
                    true
                }
                Some(_) => {
                    let woke = doorbell::wait_one(&self.sock, deadline)
                        .map_err(|e| ChannelError::os("poll(doorbell)", e))?;
                    unpark(self);
                    if woke {
                        self.drain()?;
                    }
                    woke
                }
            };
            if let Some(slot) = ready(self)? {
                return Ok(slot);
            }
            if !woke && deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ChannelError::TimedOut);
            }
        }
    }

    fn wait_tx(&mut self, deadline: Option<Instant>) -> Result<u32, ChannelError> {
        self.wait_for(
            deadline,
            Self::try_reserve,
            |s| {
                let w = RingAt {
                    region: &s.region,
                    base: RING_CTRL[s.tx_ring],
                };
                s.tx.prepare_park(&w).map_err(Self::corrupt)
            },
            |s| s.tx.unpark(&s.tx_words()),
        )
    }

    fn wait_rx(&mut self, deadline: Option<Instant>) -> Result<u32, ChannelError> {
        self.wait_for(
            deadline,
            Self::try_peek,
            |s| {
                let w = RingAt {
                    region: &s.region,
                    base: RING_CTRL[1 - s.tx_ring],
                };
                s.rx.prepare_park(&w).map_err(Self::corrupt)
            },
            |s| s.rx.unpark(&s.rx_words()),
        )
    }

    fn writer(&self, slot: u32) -> SlotWriter<'_> {
        SlotWriter::new(
            &self.region,
            self.layout.slot(self.tx_ring, slot) + SLOT_HEADER,
            self.layout.capacity,
        )
    }

    /// Writes the header of the reserved slot and publishes it.
    fn publish(&mut self, slot: u32, len: usize, status: u32, id: u64) {
        let base = self.layout.slot(self.tx_ring, slot);
        self.region
            .u32_at(base + S_LEN)
            .store(len as u32, Ordering::Relaxed);
        self.region
            .u32_at(base + S_STATUS)
            .store(status, Ordering::Relaxed);
        self.region.u64_at(base + S_ID).store(id, Ordering::Relaxed);
        let w = RingAt {
            region: &self.region,
            base: RING_CTRL[self.tx_ring],
        };
        if self.tx.publish(&w) {
            doorbell::ring(self.sock.as_fd());
        }
    }

    /// Reads the header of a received slot once and checks its length.
    fn read_header(&self, slot: u32) -> Result<SlotHeader, ChannelError> {
        let base = self.layout.slot(1 - self.tx_ring, slot);
        // The header and the first payload lines come from the peer's core:
        // ask for the payload now, so both transfers overlap instead of the
        // payload's waiting for the length.
        self.region
            .prefetch(base + SLOT_HEADER, PREFETCH.min(self.layout.capacity));
        let len = self.region.u32_at(base + S_LEN).load(Ordering::Relaxed) as usize;
        if len > self.layout.capacity {
            return Err(ChannelError::Corrupt(
                "message length exceeds slot capacity",
            ));
        }
        Ok(SlotHeader {
            len,
            status: self.region.u32_at(base + S_STATUS).load(Ordering::Relaxed),
            id: self.region.u64_at(base + S_ID).load(Ordering::Relaxed),
        })
    }

    fn payload(&self, slot: u32, len: usize) -> ShmSlice<'_> {
        ShmSlice::new(
            &self.region,
            self.layout.slot(1 - self.tx_ring, slot) + SLOT_HEADER,
            len,
        )
    }

    fn release(&mut self) {
        let w = RingAt {
            region: &self.region,
            base: RING_CTRL[1 - self.tx_ring],
        };
        if self.rx.release(&w) {
            doorbell::ring(self.sock.as_fd());
        }
    }
}

/// The client side of an open channel: sends requests, waits for replies.
///
/// ```
/// use shm_ipc::channel::{channel_pair, ChannelConfig, Client, ServerChannel};
///
/// let (client_end, server_end) = channel_pair(&ChannelConfig::default())?;
/// // Normally each end goes to its own process (see `shm_ipc::fdpass`).
/// let server = std::thread::spawn(move || {
///     let mut server = ServerChannel::open(server_end)?;
///     server.serve_next(None, |req, reply| {
///         let name = String::from_utf8(req.to_vec()).map_err(|e| e.to_string())?;
///         reply.write(format!("hello, {name}").as_bytes()).map_err(|e| e.to_string())
///     })
/// });
/// let mut client = Client::open(client_end)?;
/// assert_eq!(client.call(b"ember")?, b"hello, ember");
/// server.join().unwrap()?;
/// # Ok::<(), shm_ipc::channel::ChannelError>(())
/// ```
#[derive(Debug)]
pub struct Client {
    ep: Endpoint,
    next_id: u64,
}

impl Client {
    /// Maps the channel after checking its seals, size and header.
    pub fn open(end: ClientEnd) -> Result<Self, ChannelError> {
        Ok(Self {
            ep: Endpoint::open(end.memfd, end.sock, REQUESTS)?,
            next_id: 1,
        })
    }

    /// Sets how long to spin before parking.
    pub fn set_wait(&mut self, wait: WaitStrategy) {
        self.ep.wait = wait;
    }

    /// Largest request or reply.
    pub fn slot_capacity(&self) -> usize {
        self.ep.layout.capacity
    }

    /// Whether the server said it is draining (shutting down): it still
    /// answers, but a client that has another server should move there.
    /// One atomic load of a line the server writes once.
    pub fn draining(&self) -> bool {
        // Relaxed: a hint; nothing else is read on the strength of it.
        self.ep.region.u32_at(H_SERVER).load(Ordering::Relaxed) & SERVER_DRAINING != 0
    }

    /// Whether the server may have taken request `id`: meaningful once
    /// the server is gone ([`ChannelError::PeerGone`]), to tell a request
    /// it never began to handle (safe to send to another server) from one
    /// it may have processed. A server that does not record what it takes
    /// (an older one, or one that never opened the channel) counts as
    /// having taken everything sent.
    pub fn taken(&self, id: u64) -> bool {
        // Acquire: pairs with the server's Release stores of the flags and
        // of `claimed` (in practice the server is dead when this is read).
        let flags = self.ep.region.u32_at(H_SERVER).load(Ordering::Acquire);
        flags & SERVER_CLAIMS == 0 || self.ep.region.u64_at(H_CLAIMED).load(Ordering::Acquire) >= id
    }

    /// Whether the server is gone, found without waiting: wake-ups pending
    /// on the doorbell are drained (harmless between calls: every wait
    /// checks the ring before it parks), and end of stream means gone.
    pub fn check_peer_gone(&mut self) -> bool {
        if !self.ep.peer_gone {
            // A failed read says nothing about the peer; the next wait sees.
            let _ = self.ep.drain();
        }
        self.ep.peer_gone
    }

    /// Sends `req` and returns a copy of the reply.
    pub fn call(&mut self, req: &[u8]) -> Result<Vec<u8>, ChannelError> {
        self.call_with(None, |w| w.write(req), |reply| reply.to_vec())
    }

    /// Sends `req` and waits for its reply until `deadline`.
    pub fn call_deadline(
        &mut self,
        req: &[u8],
        deadline: Instant,
    ) -> Result<Vec<u8>, ChannelError> {
        self.call_with(Some(deadline), |w| w.write(req), |reply| reply.to_vec())
    }

    /// The zero-copy call: `write` fills a loaned request slot in place,
    /// `read` reads the reply in place. Waits for a free slot (back-pressure)
    /// and for the reply until `deadline` (`None`: forever, or until the
    /// server is gone).
    pub fn call_with<R>(
        &mut self,
        deadline: Option<Instant>,
        write: impl FnOnce(&mut SlotWriter<'_>) -> Result<(), SlotFull>,
        read: impl FnOnce(ShmSlice<'_>) -> R,
    ) -> Result<R, ChannelError> {
        let id = self.send_with(deadline, write)?;
        self.recv_reply(id, deadline, read)
    }

    /// Sends a request without waiting for its reply; returns its id.
    /// With `deadline` `None` a full ring is an immediate [`ChannelError::Full`].
    pub fn send_with(
        &mut self,
        deadline: Option<Instant>,
        write: impl FnOnce(&mut SlotWriter<'_>) -> Result<(), SlotFull>,
    ) -> Result<u64, ChannelError> {
        self.send_in_place(deadline, |w| Ok(write(w)?))
    }

    /// As [`send_with`](Self::send_with), but `write` (an encoder writing
    /// straight into the loaned slot) fails with the caller's own error
    /// type. A request is published only once `write` returned `Ok`, so an
    /// `Err` from this call, whatever its cause, means nothing was sent.
    pub fn send_in_place<E: From<ChannelError>>(
        &mut self,
        deadline: Option<Instant>,
        write: impl FnOnce(&mut SlotWriter<'_>) -> Result<(), E>,
    ) -> Result<u64, E> {
        if self.ep.peer_gone {
            return Err(ChannelError::PeerGone.into());
        }
        let slot = match deadline {
            None => self.ep.try_reserve()?.ok_or(ChannelError::Full)?,
            Some(_) => self.ep.wait_tx(deadline)?,
        };
        self.fill_and_publish(slot, write)
    }

    fn fill_and_publish<E>(
        &mut self,
        slot: u32,
        write: impl FnOnce(&mut SlotWriter<'_>) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut w = self.ep.writer(slot);
        write(&mut w)?;
        let len = w.len();
        let id = self.next_id;
        self.next_id += 1;
        self.ep.publish(slot, len, STATUS_OK, id);
        Ok(id)
    }

    /// Waits for the reply to request `id`, skipping stale replies to
    /// requests whose caller gave up.
    pub fn recv_reply<R>(
        &mut self,
        id: u64,
        deadline: Option<Instant>,
        read: impl FnOnce(ShmSlice<'_>) -> R,
    ) -> Result<R, ChannelError> {
        let mut read = Some(read);
        loop {
            let slot = self.ep.wait_rx(deadline)?;
            if let Some(out) = self.take_reply(slot, id, &mut read)? {
                return out;
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err(ChannelError::TimedOut);
            }
        }
    }

    /// Consumes the reply in `slot`: `None` if it was a stale reply to an
    /// abandoned request (skipped), else the outcome for request `id`.
    #[allow(clippy::type_complexity)]
    fn take_reply<R>(
        &mut self,
        slot: u32,
        id: u64,
        read: &mut Option<impl FnOnce(ShmSlice<'_>) -> R>,
    ) -> Result<Option<Result<R, ChannelError>>, ChannelError> {
        let h = self.ep.read_header(slot)?;
        if h.id < id {
            self.ep.release();
            return Ok(None);
        }
        if h.id > id {
            return Err(ChannelError::Corrupt("reply to a request never sent"));
        }
        let out = match h.status {
            STATUS_OK => {
                let read = read.take().expect("a reply is taken once");
                Ok(read(self.ep.payload(slot, h.len)))
            }
            STATUS_ERROR => Err(ChannelError::Remote(
                String::from_utf8_lossy(&self.ep.payload(slot, h.len).to_vec()).into_owned(),
            )),
            _ => Err(ChannelError::Corrupt("unknown reply status")),
        };
        self.ep.release();
        Ok(Some(out))
    }
}

/// A client for async code: the same channel, parked on tokio's reactor
/// instead of a blocking `poll`.
#[cfg(feature = "tokio")]
#[derive(Debug)]
pub struct AsyncClient {
    client: Client,
    doorbell: tokio::io::unix::AsyncFd<OwnedFd>,
}

#[cfg(feature = "tokio")]
impl AsyncClient {
    /// Wraps an open client; must be called inside a tokio runtime.
    pub fn new(client: Client) -> Result<Self, ChannelError> {
        let dup = client
            .ep
            .sock
            .try_clone()
            .map_err(|e| ChannelError::os("dup", e))?;
        // SAFETY: `dup` is an open descriptor owned by the AsyncFd for its
        // whole life; OwnedFd::as_raw_fd always returns that same descriptor.
        let doorbell = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(dup, tokio::io::Interest::READABLE)
        }
        .map_err(|e| ChannelError::os("epoll_ctl", e.into_parts().1))?;
        Ok(Self { client, doorbell })
    }

    /// Sends `req` and returns a copy of the reply.
    pub async fn call(&mut self, req: &[u8]) -> Result<Vec<u8>, ChannelError> {
        self.call_with(|w| w.write(req), |r| r.to_vec()).await
    }

    /// The zero-copy call (see [`Client::call_with`]); waits for room and for
    /// the reply without blocking the runtime. Wrap it in
    /// `tokio::time::timeout` for a deadline.
    pub async fn call_with<R>(
        &mut self,
        write: impl FnOnce(&mut SlotWriter<'_>) -> Result<(), SlotFull>,
        read: impl FnOnce(ShmSlice<'_>) -> R,
    ) -> Result<R, ChannelError> {
        let id = self
            .send_in_place::<ChannelError>(|w| Ok(write(w)?))
            .await?;
        self.recv_reply(id, read).await
    }

    /// Sends a request once a slot is free; returns its id (see
    /// [`Client::send_with`]).
    pub async fn send_with(
        &mut self,
        write: impl FnOnce(&mut SlotWriter<'_>) -> Result<(), SlotFull>,
    ) -> Result<u64, ChannelError> {
        self.send_in_place::<ChannelError>(|w| Ok(write(w)?)).await
    }

    /// Waits for a free request slot, lets `write` fill it in place and
    /// publishes it; returns the request's id. As with
    /// [`Client::send_in_place`], an `Err` means nothing was sent (a future
    /// dropped while it waits for room sends nothing either).
    pub async fn send_in_place<E: From<ChannelError>>(
        &mut self,
        write: impl FnOnce(&mut SlotWriter<'_>) -> Result<(), E>,
    ) -> Result<u64, E> {
        if self.client.ep.peer_gone {
            return Err(ChannelError::PeerGone.into());
        }
        let slot = self.wait(true).await?;
        self.client.fill_and_publish(slot, write)
    }

    /// Waits for the reply to request `id` (skipping stale replies, as
    /// [`Client::recv_reply`]) and lets `read` read it in place.
    pub async fn recv_reply<R>(
        &mut self,
        id: u64,
        read: impl FnOnce(ShmSlice<'_>) -> R,
    ) -> Result<R, ChannelError> {
        let mut read = Some(read);
        loop {
            let slot = self.wait(false).await?;
            if let Some(out) = self.client.take_reply(slot, id, &mut read)? {
                return out;
            }
        }
    }

    /// The blocking client inside, for its state ([`Client::draining`],
    /// [`Client::taken`]).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// [`Client::check_peer_gone`].
    pub fn check_peer_gone(&mut self) -> bool {
        self.client.check_peer_gone()
    }

    /// Waits for a free request slot (`tx`) or a reply.
    async fn wait(&mut self, tx: bool) -> Result<u32, ChannelError> {
        loop {
            let ep = &mut self.client.ep;
            let ready = if tx {
                ep.try_reserve()?
            } else {
                ep.try_peek()?
            };
            if let Some(slot) = ready {
                return Ok(slot);
            }
            if ep.peer_gone {
                return Err(ChannelError::PeerGone);
            }
            let parked = if tx {
                let w = RingAt {
                    region: &ep.region,
                    base: RING_CTRL[ep.tx_ring],
                };
                ep.tx.prepare_park(&w)
            } else {
                let w = RingAt {
                    region: &ep.region,
                    base: RING_CTRL[1 - ep.tx_ring],
                };
                ep.rx.prepare_park(&w)
            };
            if let Some(slot) = parked.map_err(Endpoint::corrupt)? {
                return Ok(slot);
            }
            let mut guard = self
                .doorbell
                .readable()
                .await
                .map_err(|e| ChannelError::os("epoll_wait", e))?;
            let ep = &mut self.client.ep;
            if tx {
                ep.tx.unpark(&ep.tx_words());
            } else {
                ep.rx.unpark(&ep.rx_words());
            }
            ep.drain()?;
            guard.clear_ready();
        }
    }
}

/// What a handler returns: `Err(message)` sends the message to the client as
/// [`ChannelError::Remote`].
pub type HandlerResult = Result<(), String>;

/// The server side of one open channel.
#[derive(Debug)]
pub struct ServerChannel {
    ep: Endpoint,
}

impl ServerChannel {
    /// Maps the channel after checking its seals, size and header.
    pub fn open(end: ServerEnd) -> Result<Self, ChannelError> {
        let ep = Endpoint::open(end.memfd, end.sock, REPLIES)?;
        // Release: pairs with the Acquire in `Client::taken`.
        ep.region
            .u32_at(H_SERVER)
            .fetch_or(SERVER_CLAIMS, Ordering::Release);
        Ok(Self { ep })
    }

    /// Tells the client this server is draining (see [`Client::draining`]);
    /// it still serves.
    pub fn set_draining(&self) {
        // Release: pairs with the client's load (a hint, see `draining`).
        self.ep
            .region
            .u32_at(H_SERVER)
            .fetch_or(SERVER_DRAINING, Ordering::Release);
    }

    /// Sets how long to spin before parking.
    pub fn set_wait(&mut self, wait: WaitStrategy) {
        self.ep.wait = wait;
    }

    /// Largest request or reply.
    pub fn slot_capacity(&self) -> usize {
        self.ep.layout.capacity
    }

    /// Whether the client is known to be gone.
    pub fn peer_gone(&self) -> bool {
        self.ep.peer_gone
    }

    /// Serves one pending request, if there is one and the client has room
    /// for the reply (a client that does not read its replies only stalls
    /// itself). The handler reads the request in place and writes the reply
    /// in place. Returns whether a request was served.
    pub fn serve_one(
        &mut self,
        handler: &mut impl FnMut(ShmSlice<'_>, &mut SlotWriter<'_>) -> HandlerResult,
    ) -> Result<bool, ChannelError> {
        let Some(reply_slot) = self.ep.try_reserve()? else {
            return Ok(false);
        };
        let Some(req_slot) = self.ep.try_peek()? else {
            return Ok(false);
        };
        self.answer(req_slot, reply_slot, handler)?;
        Ok(true)
    }

    fn answer(
        &mut self,
        req_slot: u32,
        reply_slot: u32,
        handler: &mut impl FnMut(ShmSlice<'_>, &mut SlotWriter<'_>) -> HandlerResult,
    ) -> Result<(), ChannelError> {
        let h = self.ep.read_header(req_slot)?;
        // Claimed before the handler runs: a client whose server dies
        // learns whether this request may have been processed.
        // Release: pairs with the Acquire in `Client::taken`.
        self.ep
            .region
            .u64_at(H_CLAIMED)
            .store(h.id, Ordering::Release);
        let mut w = self.ep.writer(reply_slot);
        let status = match handler(self.ep.payload(req_slot, h.len), &mut w) {
            Ok(()) => STATUS_OK,
            Err(msg) => {
                w.clear();
                let n = msg.len().min(w.capacity());
                w.write(&msg.as_bytes()[..n]).expect("bounded by capacity");
                STATUS_ERROR
            }
        };
        let len = w.len();
        // Reply first, then free the request slot: the client waits for
        // the reply, not for the slot (it caches the tail), and the
        // release's fence would otherwise hold the reply back until the
        // reply's stores reached the client's core.
        self.ep.publish(reply_slot, len, status, h.id);
        self.ep.release();
        Ok(())
    }

    /// Waits for the next request (until `deadline`) and serves it.
    pub fn serve_next(
        &mut self,
        deadline: Option<Instant>,
        mut handler: impl FnMut(ShmSlice<'_>, &mut SlotWriter<'_>) -> HandlerResult,
    ) -> Result<(), ChannelError> {
        let req_slot = self.ep.wait_rx(deadline)?;
        let reply_slot = self.ep.wait_tx(deadline)?;
        self.answer(req_slot, reply_slot, &mut handler)
    }

    /// Prepares to park with the other channels of a server. `true` means
    /// work arrived meanwhile and the caller must not park.
    pub(crate) fn prepare_park(&mut self) -> Result<bool, ChannelError> {
        if self.ep.peer_gone {
            return Ok(true);
        }
        if self.ep.try_peek()?.is_some() {
            // A request waits for reply space: park on the reply ring.
            let w = RingAt {
                region: &self.ep.region,
                base: RING_CTRL[self.ep.tx_ring],
            };
            return Ok(self
                .ep
                .tx
                .prepare_park(&w)
                .map_err(Endpoint::corrupt)?
                .is_some());
        }
        let w = RingAt {
            region: &self.ep.region,
            base: RING_CTRL[1 - self.ep.tx_ring],
        };
        Ok(self
            .ep
            .rx
            .prepare_park(&w)
            .map_err(Endpoint::corrupt)?
            .is_some())
    }

    /// Clears both parked flags and drains the doorbell if it rang.
    pub(crate) fn unpark(&mut self, rang: bool) -> Result<(), ChannelError> {
        self.ep.tx.unpark(&self.ep.tx_words());
        self.ep.rx.unpark(&self.ep.rx_words());
        if rang {
            self.ep.drain()?;
        }
        Ok(())
    }

    pub(crate) fn sock(&self) -> BorrowedFd<'_> {
        self.ep.sock.as_fd()
    }

    /// Blocks on the doorbell until it rings (draining it) or the client
    /// leaves; call between `prepare_park` and `unpark(false)`.
    pub(crate) fn park_blocking(&mut self) -> Result<(), ChannelError> {
        if doorbell::wait_and_drain(self.ep.sock.as_fd())
            .map_err(|e| ChannelError::os("recv(doorbell)", e))?
            == Drained::PeerGone
        {
            self.ep.peer_gone = true;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo(req: ShmSlice<'_>, w: &mut SlotWriter<'_>) -> HandlerResult {
        w.write(&req.to_vec()).map_err(|e| e.to_string())
    }

    #[test]
    fn round_trip_in_one_process() {
        let (c, s) = channel_pair(&ChannelConfig {
            slots: 2,
            slot_capacity: 64,
        })
        .unwrap();
        let mut c = Client::open(c).unwrap();
        let mut s = ServerChannel::open(s).unwrap();
        for i in 0..10u8 {
            let id = c.send_with(None, |w| w.write(&[i; 3])).unwrap();
            assert!(s.serve_one(&mut echo).unwrap());
            assert_eq!(c.recv_reply(id, None, |r| r.to_vec()).unwrap(), vec![i; 3]);
        }
    }

    #[test]
    fn full_ring_is_an_error_without_deadline() {
        let (c, _s) = channel_pair(&ChannelConfig {
            slots: 2,
            slot_capacity: 64,
        })
        .unwrap();
        let mut c = Client::open(c).unwrap();
        c.send_with(None, |w| w.write(b"a")).unwrap();
        c.send_with(None, |w| w.write(b"b")).unwrap();
        assert!(matches!(
            c.send_with(None, |w| w.write(b"c")),
            Err(ChannelError::Full)
        ));
        let d = Instant::now() + Duration::from_millis(20);
        assert!(matches!(
            c.send_with(Some(d), |w| w.write(b"c")),
            Err(ChannelError::TimedOut)
        ));
    }

    #[test]
    fn oversized_request_is_refused_before_sending() {
        let (c, _s) = channel_pair(&ChannelConfig {
            slots: 2,
            slot_capacity: 64,
        })
        .unwrap();
        let mut c = Client::open(c).unwrap();
        let err = c.send_with(None, |w| w.write(&[0; 65])).unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::TooLarge(SlotFull {
                    needed: 65,
                    capacity: 64
                })
            ),
            "{err}"
        );
    }

    #[test]
    fn handler_error_reaches_the_client() {
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        let mut c = Client::open(c).unwrap();
        let mut s = ServerChannel::open(s).unwrap();
        let id = c.send_with(None, |w| w.write(b"x")).unwrap();
        s.serve_one(&mut |_, _| Err("no such key".to_string()))
            .unwrap();
        let err = c.recv_reply(id, None, |_| ()).unwrap_err();
        assert!(
            matches!(&err, ChannelError::Remote(m) if m == "no such key"),
            "{err}"
        );
    }

    #[test]
    fn dropped_server_is_peer_gone_not_a_hang() {
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        let mut c = Client::open(c).unwrap();
        drop(s);
        assert!(matches!(c.call(b"x"), Err(ChannelError::PeerGone)));
    }

    #[test]
    fn a_dead_server_says_which_requests_it_took() {
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        let mut c = Client::open(c).unwrap();
        let mut s = ServerChannel::open(s).unwrap();
        let first = c.send_with(None, |w| w.write(b"1")).unwrap();
        let second = c.send_with(None, |w| w.write(b"2")).unwrap();
        assert!(s.serve_one(&mut echo).unwrap());
        // The server dies in the handler of the second request.
        let died = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            s.serve_one(&mut |_, _| std::panic::resume_unwind(Box::new("died")))
        }));
        assert!(died.is_err());
        drop(s);
        // Published after its death, before the client knew: never taken.
        let third = c.send_with(None, |w| w.write(b"3")).unwrap();
        assert_eq!(c.recv_reply(first, None, |r| r.to_vec()).unwrap(), b"1");
        assert!(matches!(
            c.recv_reply(second, None, |_| ()),
            Err(ChannelError::PeerGone)
        ));
        assert!(c.taken(second), "it began to handle the second");
        assert!(matches!(
            c.recv_reply(third, None, |_| ()),
            Err(ChannelError::PeerGone)
        ));
        assert!(!c.taken(third));
        assert!(c.check_peer_gone());
    }

    #[test]
    fn a_server_that_never_opened_counts_as_having_taken_everything() {
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        let mut c = Client::open(c).unwrap();
        assert!(!c.check_peer_gone());
        drop(s);
        let id = c.send_with(None, |w| w.write(b"x")).unwrap();
        assert!(c.recv_reply(id, None, |_| ()).is_err());
        assert!(c.taken(id));
    }

    #[test]
    fn a_draining_server_says_so_and_still_serves() {
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        let mut c = Client::open(c).unwrap();
        let mut s = ServerChannel::open(s).unwrap();
        assert!(!c.draining());
        s.set_draining();
        assert!(c.draining());
        let id = c.send_with(None, |w| w.write(b"x")).unwrap();
        assert!(s.serve_one(&mut echo).unwrap());
        assert_eq!(c.recv_reply(id, None, |r| r.to_vec()).unwrap(), b"x");
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn async_client_parks_on_the_reactor() {
        let (c, s) = channel_pair(&ChannelConfig::default()).unwrap();
        let server = std::thread::spawn(move || {
            let mut s = ServerChannel::open(s).unwrap();
            s.set_wait(WaitStrategy::PARK);
            for _ in 0..3 {
                s.serve_next(None, |req, w| {
                    w.write(&req.to_vec()).map_err(|e| e.to_string())
                })
                .unwrap();
            }
        });
        let mut c = AsyncClient::new(Client::open(c).unwrap()).unwrap();
        for msg in [&b"a"[..], b"bb", b"ccc"] {
            assert_eq!(c.call(msg).await.unwrap(), msg);
        }
        server.join().unwrap();
        assert!(matches!(c.call(b"x").await, Err(ChannelError::PeerGone)));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 64, ..Default::default() })]

        /// A third party with a writable mapping scribbles over every page of
        /// a live channel while a client and a server keep working: each call
        /// either answers correctly or fails with a channel error, the server
        /// thread ends cleanly, and nothing panics, hangs or reads out of
        /// bounds.
        #[test]
        fn scribbling_over_a_live_channel_never_crashes(
            writes in proptest::collection::vec((0usize..2 * 4096 + 8 * 2 * (64 + 128), proptest::prelude::any::<u32>()), 1..48),
        ) {
            let (c, s) = channel_pair(&ChannelConfig { slots: 8, slot_capacity: 128 }).unwrap();
            let attacker = Region::map_rw(c.fds()[0], Layout::new(8, 128).unwrap().total()).unwrap();
            // Both ends open before the attack starts: the header is read
            // once at open (a scribbled header is refused there, tested
            // below); from then on only the rings and slots matter.
            let mut s = ServerChannel::open(s).unwrap();
            let mut client = Client::open(c).unwrap();
            let server = std::thread::spawn(move || {
                s.set_wait(WaitStrategy::PARK);
                let end = Instant::now() + Duration::from_secs(5);
                loop {
                    match s.serve_next(Some(end), |req, w| w.write(&req.to_vec()).map_err(|e| e.to_string())) {
                        Ok(()) => {}
                        Err(ChannelError::PeerGone | ChannelError::TimedOut | ChannelError::Corrupt(_)) => return,
                        Err(e) => panic!("server: unexpected {e}"),
                    }
                }
            });
            for (i, (off, val)) in writes.iter().enumerate() {
                let off = (off % attacker.len()) & !3;
                attacker.u32_at(off).store(*val, Ordering::Relaxed);
                let msg = (i as u32).to_le_bytes();
                match client.call_deadline(&msg, Instant::now() + Duration::from_millis(20)) {
                    Ok(reply) => proptest::prop_assert!(reply.len() <= 128),
                    Err(ChannelError::Corrupt(_) | ChannelError::TimedOut | ChannelError::Remote(_) | ChannelError::PeerGone | ChannelError::Full) => {}
                    Err(e) => proptest::prop_assert!(false, "client: unexpected {e}"),
                }
            }
            drop(client);
            server.join().unwrap();
        }
    }

    #[test]
    fn invalid_configs_are_refused() {
        for (slots, cap) in [(0, 64), (3, 64), (8192, 64), (2, 0)] {
            let err = channel_pair(&ChannelConfig {
                slots,
                slot_capacity: cap,
            })
            .unwrap_err();
            assert!(
                matches!(err, ChannelError::Config(_)),
                "{slots}/{cap}: {err}"
            );
        }
    }

    #[test]
    fn unsealed_or_foreign_segments_are_refused() {
        let fd = segment::create_memfd(c"x", 8192).unwrap();
        let (a, _b) = crate::fdpass::stream_pair().unwrap();
        let err = Client::open(ClientEnd::from_fds(fd, a)).unwrap_err();
        assert!(
            matches!(
                err,
                ChannelError::Segment(SegmentError::MissingSeals { .. })
            ),
            "{err}"
        );

        let fd = segment::create_memfd(c"x", 8192).unwrap();
        segment::add_seals(fd.as_fd(), BASE_SEALS).unwrap();
        let (a, _b) = crate::fdpass::stream_pair().unwrap();
        let err = Client::open(ClientEnd::from_fds(fd, a)).unwrap_err();
        assert!(
            matches!(err, ChannelError::Segment(SegmentError::BadHeader(_))),
            "{err}"
        );
    }
}
