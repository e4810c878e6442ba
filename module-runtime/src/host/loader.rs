//! Loading a module or plugin `cdylib`: ELF check, `dlopen`, symbol lookup,
//! descriptor validation. Libraries are never closed (`dlclose` is unsafe
//! with Rust thread-locals and would defeat "uninstall is process exit").

use std::ffi::c_void;
use std::path::{Path, PathBuf};

use crate::abi::{self, DescriptorHeader, ModuleDescriptor, PluginDescriptor};
use crate::elf::{self, ElfError};

/// Why an artifact could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Not an ELF shared object for this host.
    #[error("bad artifact")]
    Elf(#[from] ElfError),
    /// The dynamic loader refused it (missing dependency, bad relocation...).
    #[error("dlopen {path} failed")]
    Dlopen {
        /// The file.
        path: PathBuf,
        /// The loader's message.
        #[source]
        source: libloading::Error,
    },
    /// A slim module whose shared runtime this process has not loaded (a
    /// zygote that did not preload it, or another std or SDK build).
    #[error(
        "{path} is a slim module: it needs {needed}, which this host has not loaded \
         (emberd's zygote preloads the shared runtime it offers; see docs/abi.md)"
    )]
    RuntimeNotLoaded {
        /// The file.
        path: PathBuf,
        /// The sonames it needs that are not loaded.
        needed: String,
        /// The loader's message.
        #[source]
        source: libloading::Error,
    },
    /// A plugin built slim: it would run on the std every slim module
    /// shares, in the zygote, before any fork.
    #[error(
        "{path} is a slim plugin (it needs {needed}): plugins are built fat, with their own std \
         (depend on module-runtime, not ember-sdk), because a plugin's use of the std slim \
         modules share, in the zygote, would be inherited by all of them"
    )]
    SlimPlugin {
        /// The file.
        path: PathBuf,
        /// The shared runtime libraries it needs.
        needed: String,
    },
    /// The descriptor symbol is missing: not built with `export_module!` /
    /// `export_plugin!`.
    #[error("{path} does not export `{symbol}` (not an Ember {what}?)")]
    MissingSymbol {
        /// The file.
        path: PathBuf,
        /// The symbol.
        symbol: &'static str,
        /// "module" or "plugin".
        what: &'static str,
    },
    /// The descriptor function returned null.
    #[error("{path}: `{symbol}` returned a null descriptor")]
    NullDescriptor {
        /// The file.
        path: PathBuf,
        /// The symbol.
        symbol: &'static str,
    },
    /// Wrong magic in the descriptor.
    #[error("{path}: descriptor magic is wrong (not an Ember {what})")]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// "module" or "plugin".
        what: &'static str,
    },
    /// ABI version differs.
    #[error("{path}: built for Ember ABI version {found}, this host speaks version {expected}")]
    AbiVersion {
        /// The file.
        path: PathBuf,
        /// Version in the artifact.
        found: u32,
        /// Host version.
        expected: u32,
    },
    /// Descriptor smaller than the host's struct.
    #[error("{path}: descriptor size {found} is smaller than {expected}")]
    DescriptorSize {
        /// The file.
        path: PathBuf,
        /// Declared size.
        found: u32,
        /// Host's size.
        expected: u32,
    },
    /// SDK versions are not compatible.
    #[error(
        "{path}: built with module-runtime {found}, this host runs module-runtime {expected} \
         (compatible versions share the major version, and the minor while 0.x)"
    )]
    SdkVersion {
        /// The file.
        path: PathBuf,
        /// Artifact's SDK version.
        found: String,
        /// Host SDK version.
        expected: &'static str,
    },
}

/// A loaded and validated module.
#[derive(Clone, Copy)]
pub struct LoadedModule {
    /// Its descriptor, in the module's static memory.
    pub descriptor: &'static ModuleDescriptor,
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("module_type", &self.module_type())
            .field("sdk_version", &self.sdk_version())
            .finish()
    }
}

impl LoadedModule {
    /// SDK version the module was built with.
    pub fn sdk_version(&self) -> String {
        // SAFETY: validated descriptor; strings are static in the library.
        unsafe { self.descriptor.sdk_version.to_string_lossy() }
    }

    /// Rust type of the module.
    pub fn module_type(&self) -> String {
        // SAFETY: as above.
        unsafe { self.descriptor.module_type.to_string_lossy() }
    }
}

fn open(at: &Path, path: &Path) -> Result<libloading::os::unix::Library, LoadError> {
    elf::check_file_as(at, path)?;
    let flags = libloading::os::unix::RTLD_NOW | libloading::os::unix::RTLD_LOCAL;
    // SAFETY: loading runs the library's initializers. The file passed the ELF
    // check; modules are untrusted, but they run in their own worker process,
    // which is exactly the isolation boundary. Plugins are trusted by design.
    unsafe { libloading::os::unix::Library::open(Some(at), flags) }.map_err(|source| {
        let missing = super::runtime_libs::not_loaded(at);
        if missing.is_empty() {
            LoadError::Dlopen {
                path: path.to_owned(),
                source,
            }
        } else {
            LoadError::RuntimeNotLoaded {
                path: path.to_owned(),
                needed: missing.join(", "),
                source,
            }
        }
    })
}

/// Opens the library at `at` (errors name it `path`), finds `symbol`, calls
/// it, and validates the descriptor header.
fn descriptor(
    at: &Path,
    path: &Path,
    symbol: &'static str,
    what: &'static str,
    magic: [u8; 8],
    host_size: usize,
) -> Result<*const c_void, LoadError> {
    let lib = open(at, path)?;
    // SAFETY: the symbol's type is fixed by the ABI: `extern "C" fn() -> *const _`.
    let f = unsafe { lib.get::<unsafe extern "C" fn() -> *const c_void>(symbol.as_bytes()) }
        .map_err(|_| LoadError::MissingSymbol {
            path: path.to_owned(),
            symbol,
            what,
        })?;
    // SAFETY: calling the descriptor function takes no arguments and, per the
    // ABI, returns a pointer to static data. A misbehaving artifact crashes
    // only this worker, which reports the signal.
    let ptr = unsafe { f() };
    // Never dlclose.
    std::mem::forget(lib);
    if ptr.is_null() {
        return Err(LoadError::NullDescriptor {
            path: path.to_owned(),
            symbol,
        });
    }
    // SAFETY: every Ember descriptor starts with the frozen header; reading
    // 16 bytes of the artifact's static data is valid for any version.
    let header = unsafe { std::ptr::read_unaligned(ptr.cast::<DescriptorHeader>()) };
    if header.magic != magic {
        return Err(LoadError::BadMagic {
            path: path.to_owned(),
            what,
        });
    }
    if header.abi_version != abi::ABI_VERSION {
        return Err(LoadError::AbiVersion {
            path: path.to_owned(),
            found: header.abi_version,
            expected: abi::ABI_VERSION,
        });
    }
    if (header.size as usize) < host_size {
        return Err(LoadError::DescriptorSize {
            path: path.to_owned(),
            found: header.size,
            expected: host_size as u32,
        });
    }
    Ok(ptr)
}

/// Loads a module `cdylib` and validates its descriptor. Never unloaded.
pub fn load_module(path: &Path) -> Result<LoadedModule, LoadError> {
    load_module_as(path, path)
}

/// [`load_module`] of the file at `at`, with errors naming it `path`: the
/// worker loads from a descriptor (`/proc/self/fd/N`) and reports the path
/// the user installed.
pub fn load_module_as(at: &Path, path: &Path) -> Result<LoadedModule, LoadError> {
    let ptr = descriptor(
        at,
        path,
        abi::MODULE_SYMBOL,
        "module",
        abi::MODULE_MAGIC,
        std::mem::size_of::<ModuleDescriptor>(),
    )?;
    // SAFETY: header validated: same ABI version and at least our size, so
    // the pointee is a `ModuleDescriptor` in the library's static memory,
    // which stays mapped (never dlclosed).
    let descriptor: &'static ModuleDescriptor = unsafe { &*ptr.cast::<ModuleDescriptor>() };
    let m = LoadedModule { descriptor };
    let sdk = m.sdk_version();
    if !abi::sdk_compatible(abi::SDK_VERSION, &sdk) {
        return Err(LoadError::SdkVersion {
            path: path.to_owned(),
            found: sdk,
            expected: abi::SDK_VERSION,
        });
    }
    Ok(m)
}

/// Loads a plugin `cdylib` and validates its descriptor. Never unloaded.
pub fn load_plugin(path: &Path) -> Result<&'static PluginDescriptor, LoadError> {
    elf::check_file(path)?;
    let needed = super::runtime_libs::needed_by(path);
    if !needed.is_empty() {
        return Err(LoadError::SlimPlugin {
            path: path.to_owned(),
            needed: needed.join(", "),
        });
    }
    let ptr = descriptor(
        path,
        path,
        abi::PLUGIN_SYMBOL,
        "plugin",
        abi::PLUGIN_MAGIC,
        std::mem::size_of::<PluginDescriptor>(),
    )?;
    // SAFETY: as in `load_module`.
    let d: &'static PluginDescriptor = unsafe { &*ptr.cast::<PluginDescriptor>() };
    // SAFETY: static string in the library.
    let sdk = unsafe { d.sdk_version.to_string_lossy() };
    if !abi::sdk_compatible(abi::SDK_VERSION, &sdk) {
        return Err(LoadError::SdkVersion {
            path: path.to_owned(),
            found: sdk,
            expected: abi::SDK_VERSION,
        });
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_file_is_rejected_before_dlopen() {
        let dir = std::env::temp_dir().join(format!("ember-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("libnot.so");
        std::fs::write(&p, "definitely not ELF").unwrap();
        let e = load_module(&p).unwrap_err();
        assert!(matches!(e, LoadError::Elf(ElfError::NotElf { .. })), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_file_is_a_read_error() {
        let e = load_module(Path::new("/nonexistent/libx.so")).unwrap_err();
        assert!(matches!(e, LoadError::Elf(ElfError::Read { .. })), "{e}");
    }

    #[test]
    fn shared_object_without_symbol_is_named() {
        // libc is a shared object without an Ember descriptor.
        let candidates = [
            "/lib/x86_64-linux-gnu/libc.so.6",
            "/lib/aarch64-linux-gnu/libc.so.6",
            "/usr/lib/libc.so.6",
            "/lib64/libc.so.6",
        ];
        let Some(p) = candidates.iter().map(Path::new).find(|p| p.exists()) else {
            return;
        };
        let e = load_module(p).unwrap_err();
        assert!(
            matches!(
                e,
                LoadError::MissingSymbol {
                    symbol: "ember_module_descriptor",
                    ..
                }
            ),
            "{e}"
        );
    }
}
