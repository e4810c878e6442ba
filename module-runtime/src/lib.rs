//! Ember's module runtime: the SDK module and plugin authors use, and the
//! worker side that loads a module `cdylib` into a forked process and runs
//! its lifecycle.
//!
//! A module is an ordinary library crate built as a `cdylib`:
//!
//! ```no_run
//! use module_runtime::{export_module, Module, ModuleContext, ModuleError};
//!
//! struct Hello;
//!
//! impl Module for Hello {
//!     fn start(ctx: &ModuleContext) -> Result<Self, ModuleError> {
//!         tracing::info!(replica = ctx.replica(), "starting");
//!         Ok(Hello)
//!     }
//!     fn serve(&mut self, ctx: &ModuleContext) -> Result<(), ModuleError> {
//!         ctx.ready();
//!         ctx.shutdown().wait();
//!         Ok(())
//!     }
//! }
//!
//! export_module!(Hello);
//! ```
//!
//! Layers:
//! - [`abi`] — the `#[repr(C)]` descriptors and calls between host and artifact
//!   (`docs/abi.md`);
//! - [`sdk`] — [`Module`], `AsyncModule` (feature `tokio`), [`ModuleContext`],
//!   [`Plugin`](sdk::Plugin), [`ffi_guard`] for plugin table functions, the
//!   export macros;
//! - [`manifest`] — `module.toml`;
//! - [`protocol`] — the typed control protocol between a worker and its parent;
//! - [`service`] — typed (rkyv) service clients and servers over shm-ipc;
//! - [`host`] — loader, plugin registry, fork, and the worker itself.
#![warn(missing_docs)]

pub mod abi;
pub mod elf;
pub mod host;
pub mod manifest;
pub mod protocol;
pub mod sdk;
pub mod service;
pub mod transport;

#[cfg(feature = "tokio")]
pub use sdk::AsyncModule;
pub use sdk::{error_chain, ffi_guard, Module, ModuleContext, ModuleError, PluginTable, Shutdown};

/// Re-exported so modules archive service messages and read shared data
/// with the same `rkyv` the SDK validates with.
pub use rkyv;
/// Re-exported so modules use the same `tracing` the SDK forwards.
pub use tracing;
