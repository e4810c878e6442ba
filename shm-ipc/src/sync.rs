//! Atomics shim: the ring protocol is written against these names so that the
//! same code runs on real shared memory and under the loom model checker.

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicU32, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{fence, AtomicU32, Ordering};
