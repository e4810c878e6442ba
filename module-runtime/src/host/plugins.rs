//! Plugins in the zygote: loaded and initialized once, before any fork;
//! looked up by modules in the workers through [`crate::abi::HostApi::plugin_lookup`].

use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::OnceLock;

use super::loader::{self, LoadError};
use crate::abi::{self, FfiStr, PluginHostApi};

/// A plugin to load: its `cdylib` and its config (a TOML table).
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSpec {
    /// The `cdylib`.
    pub path: PathBuf,
    /// Its config.
    pub config: toml::Table,
}

/// A loaded, initialized plugin.
#[derive(Debug, Clone)]
pub struct LoadedPlugin {
    /// Name it is looked up by.
    pub name: String,
    /// Its semver version.
    pub version: String,
    /// Table layout version.
    pub table_version: u32,
    /// Table size.
    pub table_size: u32,
    version_static: &'static str,
    table: usize,
}

/// Why plugins could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// Loading failed.
    #[error("cannot load plugin")]
    Load(#[from] LoadError),
    /// `init` returned an error or panicked.
    #[error("plugin `{name}` failed to initialize: {message}")]
    Init {
        /// Plugin name.
        name: String,
        /// Its message.
        message: String,
    },
    /// `init` returned without publishing a table.
    #[error("plugin `{0}` returned no table")]
    NoTable(String),
    /// Two plugins with one name.
    #[error("plugin `{0}` is loaded twice")]
    Duplicate(String),
    /// `init` left threads running, so the zygote could no longer fork safely.
    #[error(
        "plugin `{name}` left {threads} threads running; plugins must not start threads in init"
    )]
    Threads {
        /// Plugin name.
        name: String,
        /// Threads in the process afterwards.
        threads: usize,
    },
    /// [`load_plugins`] was already called in this process.
    #[error("plugins are already loaded in this process")]
    AlreadyLoaded,
}

static PLUGINS: OnceLock<Vec<LoadedPlugin>> = OnceLock::new();

struct InitState {
    name: String,
    error: std::sync::Mutex<Option<String>>,
}

unsafe extern "C" fn plugin_log(ctx: *const c_void, level: u32, target: FfiStr, message: FfiStr) {
    // SAFETY: `ctx` is the `InitState` living on `init_one`'s stack during
    // the call; strings are valid for the call.
    let (st, target, message) = unsafe {
        (
            &*ctx.cast::<InitState>(),
            target.to_string_lossy(),
            message.to_string_lossy(),
        )
    };
    let name = &st.name;
    match level {
        1 => tracing::error!(plugin = %name, target = %target, "{message}"),
        2 => tracing::warn!(plugin = %name, target = %target, "{message}"),
        3 => tracing::info!(plugin = %name, target = %target, "{message}"),
        _ => tracing::debug!(plugin = %name, target = %target, "{message}"),
    }
}

unsafe extern "C" fn plugin_error(ctx: *const c_void, message: FfiStr) {
    // SAFETY: as in `plugin_log`.
    let (st, message) = unsafe { (&*ctx.cast::<InitState>(), message.to_string_lossy()) };
    *st.error.lock().unwrap_or_else(|p| p.into_inner()) = Some(message);
}

/// Threads of this process, from `/proc/self/task`.
pub fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn init_one(spec: &PluginSpec) -> Result<LoadedPlugin, PluginError> {
    let d = loader::load_plugin(&spec.path)?;
    // SAFETY: static strings in a validated descriptor.
    let (name, version) = unsafe { (d.name.to_string_lossy(), d.version.to_string_lossy()) };
    let config = toml::to_string(&spec.config).unwrap_or_default();
    let state = InitState {
        name: name.clone(),
        error: std::sync::Mutex::new(None),
    };
    let api = PluginHostApi {
        abi_version: abi::ABI_VERSION,
        size: std::mem::size_of::<PluginHostApi>() as u32,
        ctx: (&state as *const InitState).cast(),
        config_toml: FfiStr::new(&config),
        log: plugin_log,
        error: plugin_error,
    };
    // SAFETY: `api`, `state` and `config` outlive the call; the descriptor
    // was validated (ABI version, size).
    let rc = unsafe { (d.init)(&api) };
    if rc != abi::CALL_OK {
        let message = state
            .error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .unwrap_or_else(|| format!("init returned {rc}"));
        return Err(PluginError::Init { name, message });
    }
    let threads = thread_count();
    if threads > 1 {
        return Err(PluginError::Threads { name, threads });
    }
    // SAFETY: `init` succeeded, so `table` may be called.
    let table = unsafe { (d.table)() };
    if table.is_null() {
        return Err(PluginError::NoTable(name));
    }
    let version_static: &'static str = Box::leak(version.clone().into_boxed_str());
    Ok(LoadedPlugin {
        name,
        version,
        table_version: d.table_version,
        table_size: d.table_size,
        version_static,
        table: table as usize,
    })
}

/// Loads and initializes `specs` in order, once per process. Call it in the
/// zygote, single-threaded, before forking any worker.
pub fn load_plugins(specs: &[PluginSpec]) -> Result<&'static [LoadedPlugin], PluginError> {
    if PLUGINS.get().is_some() {
        return Err(PluginError::AlreadyLoaded);
    }
    let mut loaded: Vec<LoadedPlugin> = Vec::new();
    for spec in specs {
        let p = init_one(spec)?;
        if loaded.iter().any(|l| l.name == p.name) {
            return Err(PluginError::Duplicate(p.name));
        }
        tracing::info!(plugin = %p.name, version = %p.version, "plugin initialized");
        loaded.push(p);
    }
    PLUGINS
        .set(loaded)
        .map_err(|_| PluginError::AlreadyLoaded)?;
    Ok(PLUGINS.get().map(Vec::as_slice).unwrap_or(&[]))
}

/// The plugins loaded in this process (inherited by workers).
pub fn loaded() -> &'static [LoadedPlugin] {
    PLUGINS.get().map(Vec::as_slice).unwrap_or(&[])
}

/// Looks a plugin up by name and table version, filling `out` as
/// [`crate::abi::HostApi::plugin_lookup`] documents.
pub(crate) fn lookup(name: &str, table_version: u32, out: &mut abi::PluginRef) -> i32 {
    let Some(p) = loaded().iter().find(|p| p.name == name) else {
        return abi::LOOKUP_NOT_FOUND;
    };
    out.table_version = p.table_version;
    out.table_size = p.table_size;
    out.plugin_version = FfiStr::new(p.version_static);
    if p.table_version != table_version {
        return abi::LOOKUP_VERSION_MISMATCH;
    }
    out.table = p.table as *const c_void;
    abi::LOOKUP_OK
}
