//! Zero-copy shared-memory IPC between mutually distrusting processes.
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
