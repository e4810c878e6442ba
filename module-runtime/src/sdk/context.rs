//! The [`ModuleContext`] a module gets, built inside the module from the
//! worker's [`HostApi`].

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::abi::{self, FfiStr, GrantKind, HostApi, PluginRef};

/// Host callbacks, shareable across threads.
#[derive(Clone, Copy)]
pub(crate) struct Host(pub(crate) &'static HostApi);

// SAFETY: the worker guarantees the HostApi outlives the process's use of it
// and that every callback is thread-safe (see `abi::HostApi`).
unsafe impl Send for Host {}
// SAFETY: as above; the struct itself is never mutated after `start`.
unsafe impl Sync for Host {}

impl Host {
    pub(crate) fn log(&self, level: u32, target: &str, message: &str) {
        // SAFETY: callback provided by the host for the process lifetime;
        // the strings outlive the call.
        unsafe { (self.0.log)(self.0.ctx, level, FfiStr::new(target), FfiStr::new(message)) }
    }

    pub(crate) fn error(&self, message: &str) {
        // SAFETY: as in `log`.
        unsafe { (self.0.error)(self.0.ctx, FfiStr::new(message)) }
    }

    fn ready(&self) {
        // SAFETY: as in `log`.
        unsafe { (self.0.ready)(self.0.ctx) }
    }

    fn remaining_ms(&self) -> i64 {
        // SAFETY: as in `log`.
        unsafe { (self.0.shutdown_remaining_ms)(self.0.ctx) }
    }

    /// The host's attach counter, if its `HostApi` carries one.
    fn attach_seq(&self) -> Option<&'static AtomicU64> {
        if (self.0.size as usize) < abi::HOST_API_ATTACH_SEQ_SIZE {
            return None;
        }
        let p = self.0.attach_seq;
        if p.is_null() || !p.cast::<AtomicU64>().is_aligned() {
            return None;
        }
        // SAFETY: `size` says the host filled `attach_seq`; it points to an
        // aligned u64 that lives for the process and that the host only
        // ever accesses atomically (docs/abi.md); we only load it.
        Some(unsafe { AtomicU64::from_ptr(p.cast_mut()) })
    }

    fn attach_fd(&self) -> Option<BorrowedFd<'static>> {
        // SAFETY: the host keeps `attach_fd` open for the process lifetime
        // (a negative number means it has none).
        (self.0.attach_fd >= 0).then(|| unsafe { BorrowedFd::borrow_raw(self.0.attach_fd) })
    }
}

/// Why a context request failed.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// No grant of that kind and name was handed in (or it was taken).
    #[error("no {kind} named `{name}` was granted to this module")]
    NotGranted {
        /// Grant kind.
        kind: &'static str,
        /// Requested name.
        name: String,
    },
    /// The config table did not deserialize into the requested type.
    #[error("invalid module config")]
    Config(#[source] toml::de::Error),
    /// Plugin not loaded in the zygote.
    #[error("plugin `{0}` is not loaded")]
    PluginNotFound(String),
    /// Plugin loaded with another table version or a too small table.
    #[error(
        "plugin `{name}` has table version {found} (size {size}), module needs version {wanted}"
    )]
    PluginVersion {
        /// Plugin name.
        name: String,
        /// Loaded version.
        found: u32,
        /// Loaded table size.
        size: u32,
        /// Requested version.
        wanted: u32,
    },
    /// A shared-data segment failed its checks (seals, header, size).
    #[error("shared data set is invalid")]
    SharedData(#[source] shm_ipc::segment::SegmentError),
    /// A descriptor operation failed.
    #[error("descriptor operation failed")]
    Io(#[source] std::io::Error),
}

/// A `#[repr(C)]` function table exported by a plugin and looked up by
/// modules.
///
/// # Safety
/// The implementing type must be `#[repr(C)]` and exactly the layout the
/// plugin publishes under `NAME` and `TABLE_VERSION`: the host hands out a
/// pointer to the plugin's table cast to `&Self`.
pub unsafe trait PluginTable: Sync + 'static {
    /// Plugin name.
    const NAME: &'static str;
    /// Table layout version.
    const TABLE_VERSION: u32;
}

/// Identity of the running instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Module name.
    pub name: String,
    /// Module version.
    pub version: String,
    /// Replica index.
    pub replica: u32,
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}#{}", self.name, self.version, self.replica)
    }
}

/// A pair of descriptors making one end of a shm-ipc service channel
/// (`memfd`, `sock`), as handed in by the supervisor.
#[derive(Debug)]
pub struct ChannelFds {
    /// The shared-memory segment.
    pub memfd: OwnedFd,
    /// The notification socket.
    pub sock: OwnedFd,
}

/// Granted descriptors by kind and name; several grants may share a name
/// (one server end per importing client).
type Grants = HashMap<(GrantKind, String), Vec<Vec<OwnedFd>>>;

/// Moves one FFI grant into `grants`.
///
/// # Safety
/// `g.name` must be valid for the call and `g.fds[..nfds]` must be open
/// descriptors whose ownership passes to the caller.
unsafe fn insert_grant(
    grants: &mut Grants,
    index: usize,
    g: &abi::FfiGrant,
) -> Result<(), BuildError> {
    let kind = GrantKind::from_u32(g.kind).ok_or(BuildError::GrantKind {
        index,
        kind: g.kind,
    })?;
    // SAFETY: valid name (caller contract).
    let name = unsafe { g.name.to_string_lossy() };
    let fds = g.fds[..(g.nfds as usize).min(2)]
        .iter()
        .filter(|fd| **fd >= 0)
        // SAFETY: ownership of the granted descriptors passes to us
        // (caller contract); nobody else closes them.
        .map(|fd| unsafe { OwnedFd::from_raw_fd(*fd) })
        .collect();
    grants.entry((kind, name)).or_default().push(fds);
    Ok(())
}

fn accept_attached(host: Host, grants: &Mutex<Grants>, local_seq: &AtomicU64) -> usize {
    let total = take_from_host(host, grants);
    if total > 0 {
        // Release: pairs with the Acquire in `Attachments::generation`.
        local_seq.fetch_add(1, Ordering::Release);
    }
    total
}

fn take_from_host(host: Host, grants: &Mutex<Grants>) -> usize {
    let mut total = 0;
    loop {
        let mut buf = [abi::FfiGrant {
            kind: 0,
            name: FfiStr::new(""),
            fds: [-1, -1],
            nfds: 0,
        }; 8];
        // SAFETY: host callback; `buf` has room for 8 grants.
        let n = unsafe { (host.0.take_attached)(host.0.ctx, buf.as_mut_ptr(), buf.len()) }
            .min(buf.len());
        let mut g = grants.lock().unwrap_or_else(|p| p.into_inner());
        for (i, grant) in buf[..n].iter().enumerate() {
            // SAFETY: the host moved these grants to us: names live for
            // the process, descriptors are ours.
            if let Err(e) = unsafe { insert_grant(&mut g, i, grant) } {
                tracing::warn!(target: "ember::context", "dropping attached grant: {e}");
            }
        }
        total += n;
        if n < buf.len() {
            return total;
        }
    }
}

/// Service ends attached after launch, reachable from any thread or task
/// (see [`ModuleContext::attachments`]).
#[derive(Clone)]
pub struct Attachments {
    host: Host,
    grants: Arc<Mutex<Grants>>,
    /// Bumped by this module each time it took attached grants from the
    /// host (the generation when the host has no counter of its own).
    local_seq: Arc<AtomicU64>,
}

impl std::fmt::Debug for Attachments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachments").finish_non_exhaustive()
    }
}

/// Longest single wait on the attach descriptor: another thread of the
/// module may take the grants (and drain the descriptor) first, which only
/// a fresh look at [`Attachments::generation`] notices.
const ATTACH_WAIT_SLICE: Duration = Duration::from_millis(20);

impl Attachments {
    /// Takes the newest client end of the imported service `name` that
    /// arrived (at launch or attached since), closing older unused ones.
    /// `NotGranted` when none is waiting. With several exporter replicas
    /// the older ends lead to the other replicas: a client that wants them
    /// all takes them with [`take_imports`](Self::take_imports), as
    /// [`ServiceClient::follow`](crate::service::ServiceClient::follow)
    /// does.
    pub fn take_latest_import(&self, name: &str) -> Result<ChannelFds, ContextError> {
        self.accept();
        let mut g = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let not_granted = || ContextError::NotGranted {
            kind: "imported service",
            name: name.to_owned(),
        };
        let mut fds = g
            .remove(&(GrantKind::Import, name.to_owned()))
            .and_then(|mut list| list.pop())
            .ok_or_else(not_granted)?
            .into_iter();
        match (fds.next(), fds.next()) {
            (Some(memfd), Some(sock)) => Ok(ChannelFds { memfd, sock }),
            _ => Err(not_granted()),
        }
    }

    /// Takes every client end of the imported service `name` waiting in
    /// the context (granted at launch or attached since), oldest first:
    /// the supervisor sends one per exporter instance the importer may
    /// call (each ready replica, and each replacement after a restart or a
    /// release).
    ///
    /// [`ServiceClient::follow`](crate::service::ServiceClient::follow)
    /// does this for you, and only when [`generation`](Self::generation)
    /// says something arrived.
    pub fn take_imports(&self, name: &str) -> Vec<ChannelFds> {
        self.take_all(GrantKind::Import, name)
    }

    /// Takes every server end of the exported service `name` waiting in
    /// the context (granted at launch or attached since).
    pub fn take_exports(&self, name: &str) -> Vec<ChannelFds> {
        self.take_all(GrantKind::Export, name)
    }

    fn take_all(&self, kind: GrantKind, name: &str) -> Vec<ChannelFds> {
        self.accept();
        let mut g = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let list = g.remove(&(kind, name.to_owned())).unwrap_or_default();
        list.into_iter()
            .filter_map(|fds| {
                let mut it = fds.into_iter();
                match (it.next(), it.next()) {
                    (Some(memfd), Some(sock)) => Some(ChannelFds { memfd, sock }),
                    _ => None,
                }
            })
            .collect()
    }

    /// The host's attach descriptor (readable while attached grants wait
    /// to be taken), for modules with their own event loop; `None` if the
    /// host has none.
    pub fn attach_fd(&self) -> Option<BorrowedFd<'static>> {
        self.host.attach_fd()
    }

    /// Moves grants waiting in the host into this context; returns how many.
    pub fn accept(&self) -> usize {
        accept_attached(self.host, &self.grants, &self.local_seq)
    }

    /// A number that changes whenever grants were attached since: compare
    /// it with the value seen last to learn, cheaply, whether a new service
    /// end may have arrived. With a current host it is one atomic load of
    /// the host's counter (`HostApi.attach_seq`); an older host has no
    /// counter, and then it costs a `poll` of the attach descriptor.
    pub fn generation(&self) -> u64 {
        match self.host.attach_seq() {
            // Acquire: pairs with the host's Release after queueing.
            Some(seq) => seq.load(Ordering::Acquire),
            None => {
                let pending = self.host.attach_fd().is_some_and(|fd| {
                    crate::transport::wait_readable(fd, Duration::ZERO).unwrap_or(false)
                });
                if pending {
                    self.accept();
                }
                self.local_seq.load(Ordering::Acquire)
            }
        }
    }

    /// Blocks until [`generation`](Self::generation) differs from `seen` or
    /// `until` passes; returns the generation then.
    pub fn wait_generation(&self, seen: u64, until: Instant) -> u64 {
        loop {
            let now_gen = self.generation();
            let now = Instant::now();
            if now_gen != seen || now >= until {
                return now_gen;
            }
            let slice = (until - now).min(ATTACH_WAIT_SLICE);
            match self.host.attach_fd() {
                // A poll failure only shortens this slice.
                Some(fd) => {
                    let _ = crate::transport::wait_readable(fd, slice);
                }
                None => std::thread::sleep(slice),
            }
        }
    }

    /// [`wait_generation`](Self::wait_generation) for async code: waits on
    /// the attach descriptor through tokio's reactor.
    #[cfg(feature = "tokio")]
    pub async fn wait_generation_async(&self, seen: u64, until: Instant) -> u64 {
        let afd = self
            .host
            .attach_fd()
            .and_then(|fd| fd.try_clone_to_owned().ok())
            .and_then(|fd| {
                // SAFETY: `fd` is an open descriptor owned by the AsyncFd for
                // its whole life; OwnedFd::as_raw_fd returns that descriptor.
                unsafe {
                    tokio::io::unix::AsyncFd::register_with_interest(
                        fd,
                        tokio::io::Interest::READABLE,
                    )
                }
                .ok()
            });
        loop {
            let now_gen = self.generation();
            let now = Instant::now();
            if now_gen != seen || now >= until {
                return now_gen;
            }
            let slice = (until - now).min(ATTACH_WAIT_SLICE);
            match &afd {
                Some(afd) => {
                    if let Ok(Ok(mut g)) = tokio::time::timeout(slice, afd.readable()).await {
                        // Level-triggered again on the next look: whoever
                        // takes the grants drains the descriptor.
                        g.clear_ready();
                    }
                }
                None => tokio::time::sleep(slice).await,
            }
        }
    }
}

/// What a module sees of its worker: identity, config, granted descriptors,
/// readiness, shutdown and plugins.
pub struct ModuleContext {
    host: Host,
    identity: Identity,
    config: toml::Table,
    grants: Arc<Mutex<Grants>>,
    local_seq: Arc<AtomicU64>,
    shutdown: Shutdown,
}

impl std::fmt::Debug for ModuleContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModuleContext")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

/// Why the context could not be built from the host's data.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BuildError {
    #[error("host ABI version {found} differs from the module's {expected}")]
    Abi { found: u32, expected: u32 },
    #[error("module config is not valid TOML")]
    Config(#[source] toml::de::Error),
    #[error("grant {index} has an unknown kind {kind}")]
    GrantKind { index: usize, kind: u32 },
}

impl ModuleContext {
    /// Builds the context, taking ownership of the granted descriptors.
    ///
    /// # Safety
    /// `host` must be the worker's `HostApi`, valid for the process lifetime,
    /// with grant descriptors this call may take ownership of.
    pub(crate) unsafe fn from_host(host: &'static HostApi) -> Result<Self, BuildError> {
        if host.abi_version != abi::ABI_VERSION || (host.size as usize) < abi::HOST_API_MIN_SIZE {
            return Err(BuildError::Abi {
                found: host.abi_version,
                expected: abi::ABI_VERSION,
            });
        }
        // SAFETY: the host's strings are valid for the process lifetime.
        let (name, version, config_text) = unsafe {
            (
                host.module_name.to_string_lossy(),
                host.module_version.to_string_lossy(),
                host.config_toml.to_string_lossy(),
            )
        };
        let config: toml::Table = toml::from_str(&config_text).map_err(BuildError::Config)?;
        let raw_grants: &[abi::FfiGrant] = if host.grants_len == 0 || host.grants.is_null() {
            &[]
        } else {
            // SAFETY: the host passes `grants_len` initialized grants.
            unsafe { std::slice::from_raw_parts(host.grants, host.grants_len) }
        };
        let mut grants = Grants::new();
        for (index, g) in raw_grants.iter().enumerate() {
            // SAFETY: the host hands these grants (names valid for the
            // process lifetime, descriptors owned by us from now on) once.
            unsafe { insert_grant(&mut grants, index, g) }?;
        }
        let h = Host(host);
        Ok(Self {
            host: h,
            identity: Identity {
                name,
                version,
                replica: host.replica,
            },
            config,
            grants: Arc::new(Mutex::new(grants)),
            local_seq: Arc::new(AtomicU64::new(0)),
            shutdown: Shutdown {
                inner: Arc::new(ShutdownInner {
                    host: h,
                    fd: host.shutdown_fd,
                }),
            },
        })
    }

    /// Takes the grants the supervisor sent after launch (for example a
    /// server end for a newly started importer) into this context, where
    /// `take_export` & co. find them. Returns how many arrived.
    pub fn accept_attached(&self) -> usize {
        accept_attached(self.host, &self.grants, &self.local_seq)
    }

    /// A handle, cloneable and `'static`, for picking up service ends the
    /// supervisor attaches while the module runs (for example a new client
    /// end after the exporter restarted).
    pub fn attachments(&self) -> Attachments {
        Attachments {
            host: self.host,
            grants: self.grants.clone(),
            local_seq: self.local_seq.clone(),
        }
    }

    /// Readable while attached grants wait for [`accept_attached`](Self::accept_attached).
    pub fn attach_fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the host keeps `attach_fd` open for the process lifetime.
        unsafe { BorrowedFd::borrow_raw(self.host.0.attach_fd) }
    }

    /// Module name, version and replica index.
    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Module name.
    pub fn name(&self) -> &str {
        &self.identity.name
    }

    /// Module version.
    pub fn version(&self) -> &str {
        &self.identity.version
    }

    /// Replica index.
    pub fn replica(&self) -> u32 {
        self.identity.replica
    }

    /// The manifest's `[config]` table.
    pub fn config(&self) -> &toml::Table {
        &self.config
    }

    /// The `[config]` table deserialized into `T`.
    pub fn config_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, ContextError> {
        toml::Value::Table(self.config.clone())
            .try_into()
            .map_err(ContextError::Config)
    }

    /// Tells the worker (and through it the supervisor) that the module is
    /// ready to serve. Idempotent.
    pub fn ready(&self) {
        self.host.ready();
    }

    /// The shutdown signal.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    fn take(
        &self,
        kind: GrantKind,
        label: &'static str,
        name: &str,
    ) -> Result<Vec<OwnedFd>, ContextError> {
        let mut g = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        let key = (kind, name.to_owned());
        let list = g.get_mut(&key).filter(|l| !l.is_empty());
        let fds = list
            .map(|l| l.remove(0))
            .ok_or_else(|| ContextError::NotGranted {
                kind: label,
                name: name.to_owned(),
            })?;
        if g.get(&key).is_some_and(Vec::is_empty) {
            g.remove(&key);
        }
        Ok(fds)
    }

    /// Names of the listeners still available.
    pub fn listener_names(&self) -> Vec<String> {
        let g = self.grants.lock().unwrap_or_else(|p| p.into_inner());
        g.keys()
            .filter(|(k, _)| *k == GrantKind::Listener)
            .map(|(_, n)| n.clone())
            .collect()
    }

    /// Takes the listening socket named `name` (socket activation).
    pub fn take_listener(&self, name: &str) -> Result<OwnedFd, ContextError> {
        let mut fds = self.take(GrantKind::Listener, "listener", name)?;
        fds.pop().ok_or_else(|| ContextError::NotGranted {
            kind: "listener",
            name: name.to_owned(),
        })
    }

    /// Takes the listener `name` as a TCP listener (blocking mode).
    pub fn tcp_listener(&self, name: &str) -> Result<std::net::TcpListener, ContextError> {
        Ok(std::net::TcpListener::from(self.take_listener(name)?))
    }

    /// Takes the client end of the imported service `name`.
    pub fn take_import(&self, name: &str) -> Result<ChannelFds, ContextError> {
        self.take_pair(GrantKind::Import, "imported service", name)
    }

    /// Takes a server end of the exported service `name`.
    pub fn take_export(&self, name: &str) -> Result<ChannelFds, ContextError> {
        self.take_pair(GrantKind::Export, "exported service", name)
    }

    fn take_pair(
        &self,
        kind: GrantKind,
        label: &'static str,
        name: &str,
    ) -> Result<ChannelFds, ContextError> {
        let mut fds = self.take(kind, label, name)?.into_iter();
        match (fds.next(), fds.next()) {
            (Some(memfd), Some(sock)) => Ok(ChannelFds { memfd, sock }),
            _ => Err(ContextError::NotGranted {
                kind: label,
                name: name.to_owned(),
            }),
        }
    }

    /// Takes every server end of the exported service `name` (one per
    /// importing client).
    pub fn take_exports(&self, name: &str) -> Vec<ChannelFds> {
        std::iter::from_fn(|| self.take_export(name).ok()).collect()
    }

    /// Takes the sealed shared-data segment `name`.
    pub fn take_shared_data(&self, name: &str) -> Result<OwnedFd, ContextError> {
        let mut fds = self.take(GrantKind::SharedData, "shared data set", name)?;
        fds.pop().ok_or_else(|| ContextError::NotGranted {
            kind: "shared data set",
            name: name.to_owned(),
        })
    }

    /// Takes and maps the sealed read-only shared-data set `name`; read it
    /// with `SealedData::access::<T>()` (checked rkyv access).
    pub fn open_shared_data(&self, name: &str) -> Result<shm_ipc::data::SealedData, ContextError> {
        let fd = self.take_shared_data(name)?;
        shm_ipc::data::SealedData::open(fd).map_err(ContextError::SharedData)
    }

    /// Looks up the plugin table `T` loaded by the zygote (in-process, no
    /// copy): same name, same table version, table at least as large as `T`.
    pub fn plugin<T: PluginTable>(&self) -> Result<&'static T, ContextError> {
        let mut out = PluginRef {
            table: std::ptr::null(),
            table_version: 0,
            table_size: 0,
            plugin_version: FfiStr::new(""),
        };
        // SAFETY: host callback; `out` is a valid place to write.
        let rc = unsafe {
            (self.host.0.plugin_lookup)(
                self.host.0.ctx,
                FfiStr::new(T::NAME),
                T::TABLE_VERSION,
                &mut out,
            )
        };
        match rc {
            abi::LOOKUP_OK
                if !out.table.is_null() && out.table_size as usize >= std::mem::size_of::<T>() =>
            {
                // SAFETY: the plugin published a table named T::NAME with
                // layout version T::TABLE_VERSION and at least size_of::<T>()
                // bytes; `PluginTable`'s contract makes T that layout. The
                // table is never unloaded.
                Ok(unsafe { &*out.table.cast::<T>() })
            }
            abi::LOOKUP_NOT_FOUND => Err(ContextError::PluginNotFound(T::NAME.to_owned())),
            _ => Err(ContextError::PluginVersion {
                name: T::NAME.to_owned(),
                found: out.table_version,
                size: out.table_size,
                wanted: T::TABLE_VERSION,
            }),
        }
    }

    pub(crate) fn host(&self) -> Host {
        self.host
    }
}

struct ShutdownInner {
    host: Host,
    fd: std::ffi::c_int,
}

/// The shutdown signal: requested once the supervisor asks the instance to
/// stop (or the worker gets `SIGTERM`), with a deadline after which the
/// process is killed. Cheap to clone, `Send + Sync`.
#[derive(Clone)]
pub struct Shutdown {
    inner: Arc<ShutdownInner>,
}

impl std::fmt::Debug for Shutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shutdown")
            .field("requested", &self.is_requested())
            .finish()
    }
}

impl Shutdown {
    fn fd(&self) -> BorrowedFd<'_> {
        // SAFETY: the host keeps `shutdown_fd` open for the process lifetime.
        unsafe { BorrowedFd::borrow_raw(self.inner.fd) }
    }

    /// Whether shutdown was requested.
    pub fn is_requested(&self) -> bool {
        self.inner.host.remaining_ms() >= 0
    }

    /// Time left before the stop deadline, once shutdown was requested.
    pub fn remaining(&self) -> Option<Duration> {
        let ms = self.inner.host.remaining_ms();
        (ms >= 0).then(|| Duration::from_millis(ms.unsigned_abs()))
    }

    /// Blocks until shutdown is requested. The wait has no timeout: the
    /// host makes the shutdown descriptor readable when a stop is
    /// requested, and nothing else wakes the caller.
    pub fn wait(&self) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        while !self.is_requested() {
            let mut fds = [PollFd::new(self.fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::NONE) {
                Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                // The descriptor is unusable (closed by the module?): fall
                // back to asking the host now and then.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Blocks until shutdown is requested or `timeout` passes; returns whether
    /// it was requested.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        // A poll failure other than EINTR falls back to the callback.
        let _ = crate::transport::wait_readable(self.fd(), timeout);
        self.is_requested()
    }

    /// Waits asynchronously until shutdown is requested.
    #[cfg(feature = "tokio")]
    pub async fn requested(&self) {
        if self.is_requested() {
            return;
        }
        let fd = match self.fd().try_clone_to_owned() {
            Ok(fd) => fd,
            Err(_) => {
                // Works on a current-thread runtime too (block_in_place
                // would panic there).
                let s = self.clone();
                let _ = tokio::task::spawn_blocking(move || s.wait()).await;
                return;
            }
        };
        // SAFETY: `fd` is an open descriptor owned by the AsyncFd for its
        // whole life, and `OwnedFd::as_raw_fd` always returns that descriptor.
        match unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE)
        } {
            Ok(afd) => {
                while !self.is_requested() {
                    match afd.readable().await {
                        Ok(mut g) if !self.is_requested() => g.clear_ready(),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
            }
            Err(_) => {
                let s = self.clone();
                let _ = tokio::task::spawn_blocking(move || s.wait()).await;
            }
        }
    }

    /// The raw shutdown descriptor (readable once shutdown is requested), for
    /// modules with their own event loop.
    pub fn as_raw_fd(&self) -> std::ffi::c_int {
        self.fd().as_raw_fd()
    }
}

impl AsFd for Shutdown {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd()
    }
}

/// An in-process host for unit tests: real descriptors, a real attach
/// queue and counter, a shutdown that tests request; the worker's
/// behaviour for the parts services use.
#[cfg(test)]
pub(crate) mod test_host {
    use super::*;
    use std::ffi::c_void;
    use std::os::fd::IntoRawFd;

    pub(crate) struct TestHost {
        queue: Mutex<Vec<abi::FfiGrant>>,
        seq: AtomicU64,
        attach_r: OwnedFd,
        attach_w: OwnedFd,
        shutdown_r: OwnedFd,
        shutdown_w: OwnedFd,
        deadline: Mutex<Option<Instant>>,
        api: std::sync::OnceLock<&'static HostApi>,
    }

    // SAFETY: FfiGrant holds a leaked static name and plain descriptor
    // numbers; all state is behind mutexes or atomics.
    unsafe impl Send for TestHost {}
    // SAFETY: as above.
    unsafe impl Sync for TestHost {}

    fn me(ctx: *const c_void) -> &'static TestHost {
        // SAFETY: ctx is the leaked TestHost set in `new`.
        unsafe { &*ctx.cast::<TestHost>() }
    }

    unsafe extern "C" fn ready(_: *const c_void) {}
    unsafe extern "C" fn log(_: *const c_void, _: u32, _: FfiStr, _: FfiStr) {}
    unsafe extern "C" fn error(_: *const c_void, _: FfiStr) {}
    unsafe extern "C" fn remaining(ctx: *const c_void) -> i64 {
        let d = *me(ctx).deadline.lock().unwrap();
        d.map_or(-1, |d| {
            d.saturating_duration_since(Instant::now()).as_millis() as i64
        })
    }
    unsafe extern "C" fn lookup(
        _: *const c_void,
        _: FfiStr,
        _: u32,
        _: *mut abi::PluginRef,
    ) -> i32 {
        abi::LOOKUP_NOT_FOUND
    }
    unsafe extern "C" fn take(ctx: *const c_void, out: *mut abi::FfiGrant, cap: usize) -> usize {
        let h = me(ctx);
        let mut q = h.queue.lock().unwrap();
        let n = q.len().min(cap);
        for (i, g) in q.drain(..n).enumerate() {
            // SAFETY: the caller gives room for `cap` grants; i < n <= cap.
            unsafe { out.add(i).write(g) };
        }
        if q.is_empty() {
            let mut buf = [0u8; 64];
            while matches!(nix::unistd::read(h.attach_r.as_fd(), &mut buf), Ok(k) if k > 0) {}
        }
        n
    }

    impl TestHost {
        /// A leaked host with `imports` client ends granted at launch.
        pub(crate) fn new(launch: Vec<(GrantKind, &'static str, ChannelFds)>) -> &'static Self {
            let (attach_r, attach_w) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC)
                    .unwrap();
            let (shutdown_r, shutdown_w) = nix::unistd::pipe().unwrap();
            let h: &'static TestHost = Box::leak(Box::new(TestHost {
                queue: Mutex::new(Vec::new()),
                seq: AtomicU64::new(0),
                attach_r,
                attach_w,
                shutdown_r,
                shutdown_w,
                deadline: Mutex::new(None),
                api: std::sync::OnceLock::new(),
            }));
            let grants: &'static [abi::FfiGrant] = Box::leak(
                launch
                    .into_iter()
                    .map(|(k, n, fds)| grant(k, n, fds))
                    .collect::<Vec<_>>()
                    .into_boxed_slice(),
            );
            let api: &'static HostApi = Box::leak(Box::new(HostApi {
                abi_version: abi::ABI_VERSION,
                size: std::mem::size_of::<HostApi>() as u32,
                ctx: (h as *const TestHost).cast(),
                module_name: FfiStr::new("test"),
                module_version: FfiStr::new("0.0.1"),
                replica: 0,
                config_toml: FfiStr::new(""),
                grants: grants.as_ptr(),
                grants_len: grants.len(),
                shutdown_fd: h.shutdown_r.as_raw_fd(),
                ready,
                log,
                error,
                shutdown_remaining_ms: remaining,
                plugin_lookup: lookup,
                attach_fd: h.attach_r.as_raw_fd(),
                take_attached: take,
                attach_seq: h.seq.as_ptr().cast_const(),
            }));
            let _ = h.api.set(api);
            h
        }

        /// The module's context (takes the launch grants; call once).
        pub(crate) fn context(&'static self) -> ModuleContext {
            // SAFETY: the API and its grants are leaked, fresh descriptors.
            unsafe { ModuleContext::from_host(self.api.get().unwrap()) }.unwrap()
        }

        /// What the worker does on `Attach`.
        pub(crate) fn attach(&self, kind: GrantKind, name: &'static str, fds: ChannelFds) {
            self.queue.lock().unwrap().push(grant(kind, name, fds));
            self.seq.fetch_add(1, Ordering::Release);
            let _ = nix::unistd::write(self.attach_w.as_fd(), b"a");
        }

        /// What the worker does on `Stop`.
        pub(crate) fn request_shutdown(&self, deadline: Duration) {
            *self.deadline.lock().unwrap() = Some(Instant::now() + deadline);
            let _ = nix::unistd::write(self.shutdown_w.as_fd(), b"s");
        }
    }

    fn grant(kind: GrantKind, name: &'static str, fds: ChannelFds) -> abi::FfiGrant {
        abi::FfiGrant {
            kind: kind as u32,
            name: FfiStr::new(name),
            fds: [fds.memfd.into_raw_fd(), fds.sock.into_raw_fd()],
            nfds: 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::c_void;
    use std::os::fd::IntoRawFd;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[repr(C)]
    struct Table {
        answer: u64,
    }

    // SAFETY: test-only table; the fake host publishes exactly this type.
    unsafe impl PluginTable for Table {
        const NAME: &'static str = "tbl";
        const TABLE_VERSION: u32 = 1;
    }

    static TABLE: Table = Table { answer: 42 };
    static READY: AtomicU32 = AtomicU32::new(0);

    unsafe extern "C" fn ready(_: *const c_void) {
        READY.fetch_add(1, Ordering::Relaxed);
    }
    unsafe extern "C" fn log(_: *const c_void, _: u32, _: FfiStr, _: FfiStr) {}
    unsafe extern "C" fn error(_: *const c_void, _: FfiStr) {}
    unsafe extern "C" fn remaining(_: *const c_void) -> i64 {
        -1
    }
    unsafe extern "C" fn lookup(
        _: *const c_void,
        name: FfiStr,
        version: u32,
        out: *mut PluginRef,
    ) -> i32 {
        // SAFETY: the caller passes a valid name and out-pointer.
        let (name, out) = unsafe { (name.to_string_lossy(), &mut *out) };
        if name != "tbl" {
            return abi::LOOKUP_NOT_FOUND;
        }
        out.table_version = 1;
        out.table_size = std::mem::size_of::<Table>() as u32;
        if version != 1 {
            return abi::LOOKUP_VERSION_MISMATCH;
        }
        out.table = (&TABLE as *const Table).cast();
        abi::LOOKUP_OK
    }

    unsafe extern "C" fn take_attached(
        _: *const c_void,
        out: *mut abi::FfiGrant,
        cap: usize,
    ) -> usize {
        static ONCE: std::sync::Once = std::sync::Once::new();
        let mut n = 0;
        ONCE.call_once(|| {
            if cap > 0 {
                // SAFETY: the caller gives room for `cap` grants.
                unsafe { out.write(grant(GrantKind::Export, "svc", pipe())) };
                n = 1;
            }
        });
        n
    }

    fn grant(kind: GrantKind, name: &'static str, fds: Vec<OwnedFd>) -> abi::FfiGrant {
        let mut raw = [-1; 2];
        let n = fds.len();
        for (slot, fd) in raw.iter_mut().zip(fds) {
            *slot = fd.into_raw_fd();
        }
        abi::FfiGrant {
            kind: kind as u32,
            name: FfiStr::new(name),
            fds: raw,
            nfds: n as u32,
        }
    }

    fn pipe() -> Vec<OwnedFd> {
        let (r, w) = nix::unistd::pipe().unwrap();
        vec![r, w]
    }

    fn fake_host() -> &'static HostApi {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let grants: &'static [abi::FfiGrant] = Box::leak(Box::new([
            grant(GrantKind::Listener, "http", vec![OwnedFd::from(l)]),
            grant(GrantKind::Export, "svc", pipe()),
            grant(GrantKind::Export, "svc", pipe()),
            grant(GrantKind::Import, "kv", pipe()),
        ]));
        let (shutdown_r, _w) = nix::unistd::pipe().unwrap();
        let (attach_r, _aw) = nix::unistd::pipe().unwrap();
        Box::leak(Box::new(HostApi {
            abi_version: abi::ABI_VERSION,
            size: std::mem::size_of::<HostApi>() as u32,
            ctx: std::ptr::null(),
            module_name: FfiStr::new("m"),
            module_version: FfiStr::new("1.2.3"),
            replica: 4,
            config_toml: FfiStr::new("greeting = \"hi\"\nthreads = 3\n"),
            grants: grants.as_ptr(),
            grants_len: grants.len(),
            shutdown_fd: shutdown_r.into_raw_fd(),
            ready,
            log,
            error,
            shutdown_remaining_ms: remaining,
            plugin_lookup: lookup,
            attach_fd: attach_r.into_raw_fd(),
            take_attached,
            attach_seq: std::ptr::null(),
        }))
    }

    #[test]
    fn context_hands_out_each_grant_once() {
        // SAFETY: the fake host lives forever and its grants are fresh fds.
        let ctx = unsafe { ModuleContext::from_host(fake_host()) }.unwrap();
        assert_eq!(ctx.identity().to_string(), "m@1.2.3#4");
        assert_eq!(ctx.config()["threads"].as_integer(), Some(3));
        #[derive(serde::Deserialize)]
        struct Cfg {
            greeting: String,
        }
        assert_eq!(ctx.config_as::<Cfg>().unwrap().greeting, "hi");
        assert_eq!(ctx.listener_names(), ["http"]);
        ctx.tcp_listener("http").unwrap();
        assert!(matches!(
            ctx.tcp_listener("http"),
            Err(ContextError::NotGranted {
                kind: "listener",
                ..
            })
        ));
        assert_eq!(ctx.take_exports("svc").len(), 2);
        assert!(ctx.take_export("svc").is_err());
        assert_eq!(ctx.accept_attached(), 1);
        assert_eq!(ctx.accept_attached(), 0);
        assert_eq!(ctx.take_exports("svc").len(), 1);
        ctx.take_import("kv").unwrap();
        let e = ctx.take_import("nope").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no imported service named `nope` was granted to this module"
        );
        assert!(!ctx.shutdown().is_requested());
        assert!(!ctx.shutdown().wait_timeout(Duration::from_millis(1)));
        ctx.ready();
        assert_eq!(READY.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn plugin_lookup_checks_name_and_version() {
        // SAFETY: as above.
        let ctx = unsafe { ModuleContext::from_host(fake_host()) }.unwrap();
        assert_eq!(ctx.plugin::<Table>().unwrap().answer, 42);

        #[repr(C)]
        #[derive(Debug)]
        struct V2;
        // SAFETY: never dereferenced: the lookup refuses the version.
        unsafe impl PluginTable for V2 {
            const NAME: &'static str = "tbl";
            const TABLE_VERSION: u32 = 2;
        }
        let e = ctx.plugin::<V2>().unwrap_err();
        assert!(
            matches!(
                e,
                ContextError::PluginVersion {
                    found: 1,
                    wanted: 2,
                    ..
                }
            ),
            "{e}"
        );

        #[derive(Debug)]
        struct Missing;
        // SAFETY: never dereferenced: no such plugin.
        unsafe impl PluginTable for Missing {
            const NAME: &'static str = "missing";
            const TABLE_VERSION: u32 = 1;
        }
        assert!(matches!(
            ctx.plugin::<Missing>(),
            Err(ContextError::PluginNotFound(_))
        ));
    }
}
