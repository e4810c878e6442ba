//! The host side: what the zygote and the worker run. Loads artifacts,
//! initializes plugins before the fork, forks workers, and runs a module's
//! lifecycle inside a worker.

pub mod fork;
pub mod heap;
pub mod loader;
pub mod plugins;
pub mod process;
pub mod runtime_libs;
pub mod sandbox;
pub mod worker;

pub use fork::{fork_worker, ForkError, NewWorker};
pub use loader::{load_module, load_plugin, LoadError, LoadedModule};
pub use plugins::{load_plugins, LoadedPlugin, PluginError, PluginSpec};
pub use process::ProcessError;
pub use runtime_libs::{RuntimeLibs, RuntimeLibsError};
