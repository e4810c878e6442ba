//! The C ABI between a host (zygote or worker) and a module or plugin `cdylib`.
//!
//! A fat module and every plugin is compiled with its own copy of Rust's
//! standard library and of this crate; a slim module shares one with the
//! other slim modules, not with its host (`host::runtime_libs`). Either
//! way nothing Rust-specific crosses the boundary: only `#[repr(C)]`
//! structs, C function pointers, UTF-8 byte ranges ([`FfiStr`]) and raw
//! descriptor numbers. The layout is documented
//! in `docs/abi.md`; changing any struct here means bumping [`ABI_VERSION`].
//!
//! Versioning rule: the [`DescriptorHeader`] (magic, ABI version, size) is
//! frozen forever, so any host can read it from any artifact. A host loads an
//! artifact only if the magic matches, `abi_version == ABI_VERSION`, `size`
//! covers the struct it knows, and the SDK versions are compatible
//! ([`sdk_compatible`]).

use std::ffi::{c_int, c_void};

/// Version of every `#[repr(C)]` struct and call in this module.
pub const ABI_VERSION: u32 = 1;

/// The one symbol a module exports: `extern "C" fn() -> *const ModuleDescriptor`.
pub const MODULE_SYMBOL: &str = "ember_module_descriptor";
/// The one symbol a plugin exports: `extern "C" fn() -> *const PluginDescriptor`.
pub const PLUGIN_SYMBOL: &str = "ember_plugin_descriptor";

/// Magic at the start of a [`ModuleDescriptor`].
pub const MODULE_MAGIC: [u8; 8] = *b"EMBERMOD";
/// Magic at the start of a [`PluginDescriptor`].
pub const PLUGIN_MAGIC: [u8; 8] = *b"EMBERPLG";

/// Version of this crate, compiled into every artifact's descriptor.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Result of a call into a module or plugin: everything went well.
pub const CALL_OK: i32 = 0;
/// The call returned an error; its message was passed to the host's `error` callback.
pub const CALL_ERROR: i32 = 1;
/// The call panicked; the panic message was passed to the host's `error` callback.
pub const CALL_PANIC: i32 = 2;

/// Whether an artifact built against SDK `artifact` may be run by a host of
/// SDK `host`: same major version, and for `0.x` the same minor version.
pub fn sdk_compatible(host: &str, artifact: &str) -> bool {
    fn parts(v: &str) -> Option<(u64, u64)> {
        let mut it = v.split('.');
        let major = it.next()?.parse().ok()?;
        let minor = it.next()?.parse().ok()?;
        Some((major, minor))
    }
    match (parts(host), parts(artifact)) {
        (Some((0, h)), Some((0, a))) => h == a,
        (Some((h, _)), Some((a, _))) => h == a,
        _ => false,
    }
}

/// A borrowed UTF-8 string passed across the boundary: pointer and length,
/// no terminator. Valid for the duration of the call unless stated otherwise.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiStr {
    /// First byte; may dangle when `len == 0`.
    pub ptr: *const u8,
    /// Length in bytes.
    pub len: usize,
}

impl FfiStr {
    /// Borrows `s`; the caller keeps `s` alive while the other side reads it.
    pub const fn new(s: &str) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// Copies the bytes into an owned `String`, replacing invalid UTF-8.
    ///
    /// # Safety
    /// `ptr..ptr+len` must be readable for the duration of the call (or
    /// `len == 0`).
    pub unsafe fn to_string_lossy(self) -> String {
        if self.len == 0 || self.ptr.is_null() {
            return String::new();
        }
        // SAFETY: the caller guarantees `ptr..ptr+len` is readable.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        String::from_utf8_lossy(bytes).into_owned()
    }
}

/// The frozen prefix of every descriptor.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct DescriptorHeader {
    /// [`MODULE_MAGIC`] or [`PLUGIN_MAGIC`].
    pub magic: [u8; 8],
    /// The [`ABI_VERSION`] the artifact was built with.
    pub abi_version: u32,
    /// `size_of` the whole descriptor as the artifact knows it.
    pub size: u32,
}

/// What a module's [`MODULE_SYMBOL`] returns. Lives in the module's static
/// memory for the life of the process.
#[repr(C)]
pub struct ModuleDescriptor {
    /// Frozen prefix.
    pub header: DescriptorHeader,
    /// [`SDK_VERSION`] of the SDK the module was built with.
    pub sdk_version: FfiStr,
    /// Rust type name of the module, for diagnostics.
    pub module_type: FfiStr,
    /// Builds the module from the launch data in `host`; on success stores an
    /// opaque instance pointer in `*instance`. `host` stays valid for the
    /// life of the process. Returns a `CALL_*` code.
    pub start: unsafe extern "C" fn(host: *const HostApi, instance: *mut *mut c_void) -> i32,
    /// Runs the module until it is done or shutdown was requested and it has
    /// wound down. Returns a `CALL_*` code.
    pub serve: unsafe extern "C" fn(instance: *mut c_void) -> i32,
    /// Releases the module's resources within the shutdown deadline. Consumes
    /// the instance. Returns a `CALL_*` code.
    pub stop: unsafe extern "C" fn(instance: *mut c_void) -> i32,
}

// SAFETY: the descriptor is immutable static data (string literals and
// function pointers); sharing it between threads cannot race.
unsafe impl Sync for ModuleDescriptor {}

/// Kind of a descriptor grant in [`FfiGrant`] and in the launch order.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GrantKind {
    /// A listening socket (one fd), socket-activation style.
    Listener = 1,
    /// The client end of an imported service (two fds: memfd, socket).
    Import = 2,
    /// A server end of an exported service (two fds: memfd, socket).
    Export = 3,
    /// A sealed read-only shared-data segment (one memfd).
    SharedData = 4,
    /// The instance's log file (one fd): the worker makes it stdout and
    /// stderr before loading the module; never handed to the module.
    Stdio = 5,
    /// The module's `cdylib` (one fd, read-only; emberd sends a sealed
    /// memfd or its stored copy): the worker loads the module from this
    /// descriptor instead of the order's path; never handed to the module.
    Artifact = 6,
}

impl GrantKind {
    /// Parses the wire value.
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            1 => Some(Self::Listener),
            2 => Some(Self::Import),
            3 => Some(Self::Export),
            4 => Some(Self::SharedData),
            5 => Some(Self::Stdio),
            6 => Some(Self::Artifact),
            _ => None,
        }
    }

    /// How many descriptors a grant of this kind carries.
    pub fn fd_count(self) -> usize {
        match self {
            Self::Listener | Self::SharedData | Self::Stdio | Self::Artifact => 1,
            Self::Import | Self::Export => 2,
        }
    }
}

/// One descriptor grant handed to a module; ownership of `fds[..nfds]`
/// passes to the module when `start` is called.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct FfiGrant {
    /// A [`GrantKind`] value.
    pub kind: u32,
    /// The name from the manifest (listener, service or data set name).
    pub name: FfiStr,
    /// Descriptors; unused slots are `-1`.
    pub fds: [c_int; 2],
    /// How many of `fds` are used.
    pub nfds: u32,
}

/// A plugin table found by [`HostApi::plugin_lookup`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct PluginRef {
    /// The plugin's `#[repr(C)]` table; valid for the life of the process.
    pub table: *const c_void,
    /// Version of the table layout.
    pub table_version: u32,
    /// `size_of` the table as the plugin built it.
    pub table_size: u32,
    /// The plugin's own (semver) version, for diagnostics; static.
    pub plugin_version: FfiStr,
}

/// [`HostApi::plugin_lookup`]: found.
pub const LOOKUP_OK: i32 = 0;
/// [`HostApi::plugin_lookup`]: no plugin of that name is loaded.
pub const LOOKUP_NOT_FOUND: i32 = 1;
/// [`HostApi::plugin_lookup`]: loaded, but its table version differs.
pub const LOOKUP_VERSION_MISMATCH: i32 = 2;

/// What the worker gives a module's `start`. All pointers stay valid for the
/// life of the process; all callbacks are thread-safe.
#[repr(C)]
pub struct HostApi {
    /// [`ABI_VERSION`] of the host.
    pub abi_version: u32,
    /// `size_of::<HostApi>()` as the host built it.
    pub size: u32,
    /// Opaque host state passed back to every callback.
    pub ctx: *const c_void,
    /// Module name from the manifest.
    pub module_name: FfiStr,
    /// Module version from the manifest.
    pub module_version: FfiStr,
    /// Replica index of this instance.
    pub replica: u32,
    /// The manifest's `[config]` table, serialized as TOML.
    pub config_toml: FfiStr,
    /// The descriptor grants (listeners, service ends, shared data).
    pub grants: *const FfiGrant,
    /// Number of grants.
    pub grants_len: usize,
    /// Becomes readable (and stays readable) when shutdown is requested.
    /// Owned by the host: modules `dup` it if they need their own.
    pub shutdown_fd: c_int,
    /// The module is ready to serve.
    pub ready: unsafe extern "C" fn(ctx: *const c_void),
    /// One log record. `level`: 1 error, 2 warn, 3 info, 4 debug, 5 trace.
    pub log: unsafe extern "C" fn(ctx: *const c_void, level: u32, target: FfiStr, message: FfiStr),
    /// Message describing why the current call returns `CALL_ERROR`/`CALL_PANIC`.
    pub error: unsafe extern "C" fn(ctx: *const c_void, message: FfiStr),
    /// Milliseconds left before the stop deadline; `-1` while no shutdown
    /// was requested.
    pub shutdown_remaining_ms: unsafe extern "C" fn(ctx: *const c_void) -> i64,
    /// Finds a plugin loaded by the zygote. Returns a `LOOKUP_*` code and
    /// fills `*out` (also on version mismatch, with the loaded version).
    pub plugin_lookup: unsafe extern "C" fn(
        ctx: *const c_void,
        name: FfiStr,
        table_version: u32,
        out: *mut PluginRef,
    ) -> i32,
    /// Readable while grants sent after launch (`Attach`, e.g. the server
    /// end for a new importer) wait to be taken. Owned by the host.
    pub attach_fd: c_int,
    /// Moves up to `cap` pending attached grants into `out` and returns how
    /// many; ownership of their descriptors passes to the module. Names stay
    /// valid for the process lifetime.
    pub take_attached:
        unsafe extern "C" fn(ctx: *const c_void, out: *mut FfiGrant, cap: usize) -> usize,
    /// Appended in version 1 (present when `size >= 160`,
    /// [`HOST_API_ATTACH_SEQ_SIZE`]): a 64-bit counter, 8-byte aligned and
    /// valid for the process lifetime, that the host increments (atomically,
    /// with release ordering) after it queued the grants of each `Attach`.
    /// Modules only read it, atomically with acquire ordering: a value that
    /// differs from the one seen last means new grants may wait for
    /// `take_attached`, without a callback or a system call. May be null.
    pub attach_seq: *const u64,
}

/// Smallest `HostApi` an artifact of this version accepts: the struct as
/// version 1 was first published (up to `take_attached`). Fields appended
/// since are used only when `size` covers them.
pub const HOST_API_MIN_SIZE: usize = std::mem::offset_of!(HostApi, attach_seq);

/// A `HostApi` at least this long carries [`HostApi::attach_seq`].
pub const HOST_API_ATTACH_SEQ_SIZE: usize =
    std::mem::offset_of!(HostApi, attach_seq) + std::mem::size_of::<*const u64>();

/// What a plugin's [`PLUGIN_SYMBOL`] returns.
#[repr(C)]
pub struct PluginDescriptor {
    /// Frozen prefix.
    pub header: DescriptorHeader,
    /// [`SDK_VERSION`] the plugin was built with.
    pub sdk_version: FfiStr,
    /// Name modules look it up by.
    pub name: FfiStr,
    /// The plugin's semver version.
    pub version: FfiStr,
    /// Version of its table layout.
    pub table_version: u32,
    /// `size_of` its table.
    pub table_size: u32,
    /// Initializes the plugin once, in the zygote, before any fork. Must not
    /// leave threads running. Returns a `CALL_*` code.
    pub init: unsafe extern "C" fn(host: *const PluginHostApi) -> i32,
    /// The plugin's table; called only after a successful `init`.
    pub table: unsafe extern "C" fn() -> *const c_void,
}

// SAFETY: immutable static data (string literals and function pointers).
unsafe impl Sync for PluginDescriptor {}

/// What the zygote gives a plugin's `init`. Valid only during the call.
#[repr(C)]
pub struct PluginHostApi {
    /// [`ABI_VERSION`] of the host.
    pub abi_version: u32,
    /// `size_of::<PluginHostApi>()` as the host built it.
    pub size: u32,
    /// Opaque host state.
    pub ctx: *const c_void,
    /// The plugin's config, serialized as TOML.
    pub config_toml: FfiStr,
    /// One log record; levels as in [`HostApi::log`].
    pub log: unsafe extern "C" fn(ctx: *const c_void, level: u32, target: FfiStr, message: FfiStr),
    /// Message describing why `init` fails.
    pub error: unsafe extern "C" fn(ctx: *const c_void, message: FfiStr),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_compatibility_follows_semver() {
        assert!(sdk_compatible("0.1.0", "0.1.7"));
        assert!(!sdk_compatible("0.1.0", "0.2.0"));
        assert!(sdk_compatible("1.2.0", "1.0.3"));
        assert!(!sdk_compatible("1.2.0", "2.0.0"));
        assert!(!sdk_compatible("1.2.0", "garbage"));
    }

    #[test]
    fn header_layout_is_frozen() {
        assert_eq!(std::mem::size_of::<DescriptorHeader>(), 16);
        assert_eq!(std::mem::offset_of!(DescriptorHeader, abi_version), 8);
        assert_eq!(std::mem::offset_of!(DescriptorHeader, size), 12);
    }

    #[test]
    #[cfg(target_pointer_width = "64")]
    fn layouts_match_docs_abi_md() {
        use std::mem::{offset_of, size_of};
        assert_eq!(size_of::<FfiStr>(), 16);
        assert_eq!(size_of::<ModuleDescriptor>(), 72);
        assert_eq!(offset_of!(ModuleDescriptor, start), 48);
        assert_eq!(size_of::<HostApi>(), 160);
        assert_eq!(HOST_API_MIN_SIZE, 152);
        assert_eq!(offset_of!(HostApi, attach_seq), 152);
        assert_eq!(HOST_API_ATTACH_SEQ_SIZE, 160);
        assert_eq!(offset_of!(HostApi, attach_fd), 136);
        assert_eq!(offset_of!(HostApi, take_attached), 144);
        assert_eq!(offset_of!(HostApi, config_toml), 56);
        assert_eq!(offset_of!(HostApi, shutdown_fd), 88);
        assert_eq!(offset_of!(HostApi, plugin_lookup), 128);
        assert_eq!(size_of::<FfiGrant>(), 40);
        assert_eq!(size_of::<PluginRef>(), 32);
        assert_eq!(size_of::<PluginDescriptor>(), 88);
        assert_eq!(offset_of!(PluginDescriptor, init), 72);
        assert_eq!(size_of::<PluginHostApi>(), 48);
    }

    #[test]
    fn grant_kinds_round_trip() {
        for k in [
            GrantKind::Listener,
            GrantKind::Import,
            GrantKind::Export,
            GrantKind::SharedData,
            GrantKind::Stdio,
            GrantKind::Artifact,
        ] {
            assert_eq!(GrantKind::from_u32(k as u32), Some(k));
        }
        assert_eq!(GrantKind::from_u32(9), None);
    }
}
