//! Plugins the zygote loads before any fork, so every worker inherits them
//! copy-on-write.
//!
//! Seam: [`preload`] will call
//! `module_runtime::host::plugins::load_plugins(&[module_runtime::host::plugins::PluginSpec { path, config }])`
//! (dlopen, ABI check, `init`, no-threads check); until then it checks that
//! the files are readable and keeps their paths.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A plugin to load: its `cdylib` and its config table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginSpec {
    /// The `cdylib`.
    pub path: PathBuf,
    /// Its configuration (handed to the plugin's `init`).
    #[serde(default)]
    pub config: toml::Table,
}

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
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// The file is missing or unreadable.
    #[error("plugin {}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Plugins loaded into the zygote; kept alive for its whole life.
#[derive(Debug, Default)]
pub struct Plugins {
    paths: Vec<PathBuf>,
}

impl Plugins {
    /// How many plugins are loaded.
    pub fn len(&self) -> usize {
        self.paths.len()
    }
    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.paths.is_empty()
    }
}

/// Loads every plugin, in order. Runs in the single-threaded zygote before
/// the first fork; a plugin must not leave threads behind.
pub fn preload(specs: &[PluginSpec]) -> Result<Plugins, PluginError> {
    let mut loaded = Vec::with_capacity(specs.len());
    for s in specs {
        check_readable(&s.path)?;
        loaded.push(s.path.clone());
    }
    Ok(Plugins { paths: loaded })
}

fn check_readable(path: &Path) -> Result<(), PluginError> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|source| PluginError::Unreadable {
            path: path.to_owned(),
            source,
        })
}
