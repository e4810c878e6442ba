//! Zero-copy shared-memory IPC between mutually distrusting processes.
//!
//! This is the transport under Ember's services and shared data:
//!
//! - [`segment`]: `memfd` segments, sealed so nobody can resize them (no
//!   `SIGBUS`), passed as descriptors ([`fdpass`]: `SCM_RIGHTS`).
//! - [`channel`]: a request/response channel between exactly two processes:
//!   one segment with a ring of fixed-size slots each way. A sender loans a
//!   slot and writes its message in place ([`SlotWriter`]); the receiver
//!   reads it in place ([`ShmSlice`]: `fold_words` scans it word by word
//!   straight from the segment, `for_each_chunk` and `copy_to` copy it out).
//!   Writes of 256 KiB or more use cached or streaming (non-temporal)
//!   stores, whichever took less time lately on that endpoint: which one
//!   is cheaper depends on whether the two processes' cores share a cache.
//!   Waiting is a bounded spin, then a park
//!   on a socketpair doorbell that also reports peer death. Blocking API and
//!   an async one ([`channel::AsyncClient`], tokio; feature `tokio`, off by
//!   default, so synchronous users do not link tokio).
//! - [`service`]: one server serving many clients, one channel each, with a
//!   per-client quota per round.
//! - [`data`]: sealed read-only rkyv archives readers use without copying,
//!   with atomic version changes.
//!
//! The byte layout and protocol are specified in `docs/shm-layout.md`.
//!
//! # A two-process service
//!
//! Whoever wires the processes (in Ember, the supervisor) creates the
//! channel and sends each end to its process; the ends are just two
//! descriptors each:
//!
//! ```no_run
//! use std::os::fd::AsFd;
//! use std::os::unix::net::UnixStream;
//! use shm_ipc::channel::{channel_pair, ChannelConfig, Client, ClientEnd, ServerEnd};
//! use shm_ipc::{fdpass, service::Server};
//!
//! # fn wire(to_server: UnixStream, to_client: UnixStream) -> Result<(), Box<dyn std::error::Error>> {
//! // The wiring process:
//! let (client_end, server_end) = channel_pair(&ChannelConfig::default())?;
//! fdpass::send_with_fds(to_server.as_fd(), b"S", &server_end.fds())?;
//! fdpass::send_with_fds(to_client.as_fd(), b"C", &client_end.fds())?;
//! drop((client_end, server_end)); // keep no copy: peer death must be visible
//! # Ok(()) }
//! # fn server(sock: UnixStream) -> Result<(), Box<dyn std::error::Error>> {
//! // The server process:
//! let (_, mut fds) = fdpass::recv_with_fds(sock.as_fd(), &mut [0u8; 1])?;
//! let (doorbell, memfd) = (fds.pop().unwrap(), fds.pop().unwrap());
//! let mut server = Server::new();
//! server.add(ServerEnd::from_fds(memfd, doorbell))?;
//! server.run(None, |_client, request, reply| {
//!     let n = request.len() as u32;
//!     reply.write(&n.to_le_bytes()).map_err(|e| e.to_string())
//! })?;
//! # Ok(()) }
//! # fn client(sock: UnixStream) -> Result<(), Box<dyn std::error::Error>> {
//! // The client process:
//! let (_, mut fds) = fdpass::recv_with_fds(sock.as_fd(), &mut [0u8; 1])?;
//! let (doorbell, memfd) = (fds.pop().unwrap(), fds.pop().unwrap());
//! let mut client = Client::open(ClientEnd::from_fds(memfd, doorbell))?;
//! assert_eq!(client.call(b"four")?, 4u32.to_le_bytes());
//! # Ok(()) }
//! ```
//!
//! # Threat model
//!
//! The two processes on a channel do not trust each other. Either may, at
//! any moment, write any bytes to any page of the segment it can write, stop
//! responding, or die halfway through a message. What this crate guarantees
//! to the *other* side:
//!
//! - No crash, no out-of-bounds access, no undefined behaviour: every index,
//!   length and offset the peer can write is read once into a private
//!   variable and range-checked before use; the segment layout is read once
//!   at open and validated against the file size; memory the peer can write
//!   is never behind `&T` or `&[u8]`, only read through atomics, as words
//!   read into registers, or copied into private memory first
//!   ([`ShmSlice`]).
//! - No `SIGBUS`: segments are sealed against shrinking before anyone maps
//!   them, and openers check the seals.
//! - No hang: waits take deadlines, and peer death is seen as end of stream
//!   on the doorbell socket ([`channel::ChannelError::PeerGone`]).
//! - An error, not garbage, where the peer broke the protocol
//!   ([`channel::ChannelError::Corrupt`]). Payload *contents* are the peer's
//!   to choose: validate them (typed layers use rkyv's checked access on a
//!   private copy).
//! - Isolation between clients of one server: each has its own segment, so a
//!   hostile client can only damage its own channel.
//!
//! Shared data is different: a data segment is sealed with `F_SEAL_WRITE`
//! before any reader maps it, so its bytes can be used in place (`&[u8]`),
//! validated once, or used unchecked when the writer is trusted.
//!
//! Out of scope: a peer can always refuse to answer (use deadlines), and a
//! process that shares its descriptors with a third process shares its trust.
#![warn(missing_docs)]

#[cfg(not(loom))]
mod bytes;
#[cfg(not(loom))]
pub mod channel;
#[cfg(not(loom))]
pub mod data;
#[cfg(not(loom))]
mod doorbell;
#[cfg(not(loom))]
pub mod fdpass;
#[cfg(not(loom))]
mod region;
mod ring;
#[cfg(not(loom))]
pub mod segment;
#[cfg(not(loom))]
pub mod service;
mod sync;

#[cfg(not(loom))]
pub use bytes::{ShmSlice, SlotFull, SlotWriter};
