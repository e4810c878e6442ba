//! Plugins the zygote loads before any fork, so every worker inherits them
//! copy-on-write.
//!
//! [`preload`] calls `module_runtime::host::plugins::load_plugins`.

use std::path::PathBuf;

use serde::Deserialize;

/// A plugin to load: its `cdylib` and its config table (module-runtime's
/// type: it travels to the zygote in `ToZygote::Hello`).
pub use module_runtime::host::plugins::PluginSpec;

/// A plugin entry in the daemon config: a path, or a table with `path` and
/// `config`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PluginEntry {
    /// `"/path/libx.so"`.
    Path(PathBuf),
    /// `{ path = "/path/libx.so", config = { … } }`.
    Spec(PluginSpecEntry),
}

/// The table form of [`PluginEntry`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginSpecEntry {
    /// The `cdylib`.
    pub path: PathBuf,
    /// Its configuration.
    #[serde(default)]
    pub config: toml::Table,
}

impl PluginEntry {
    /// As a spec.
    pub fn spec(&self) -> PluginSpec {
        match self {
            PluginEntry::Path(p) => PluginSpec {
                path: p.clone(),
                config: toml::Table::new(),
            },
            PluginEntry::Spec(s) => PluginSpec {
                path: s.path.clone(),
                config: s.config.clone(),
            },
        }
    }
}

/// A plugin could not be loaded.
pub type PluginError = module_runtime::host::plugins::PluginError;

/// Plugins loaded into the zygote; kept alive for its whole life.
#[derive(Debug, Default)]
pub struct Plugins {
    loaded: &'static [module_runtime::host::plugins::LoadedPlugin],
}

impl Plugins {
    /// How many plugins are loaded.
    pub fn len(&self) -> usize {
        self.loaded.len()
    }
    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.loaded.is_empty()
    }
}

/// Loads every plugin, in order, with module-runtime's loader (dlopen, ABI
/// check, `init`, no-threads check). Runs in the single-threaded zygote
/// before the first fork.
pub fn preload(specs: &[PluginSpec]) -> Result<Plugins, PluginError> {
    Ok(Plugins {
        loaded: module_runtime::host::plugins::load_plugins(specs)?,
    })
}
