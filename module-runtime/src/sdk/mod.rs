//! The SDK module and plugin authors use.
//!
//! A module is a `cdylib` crate that implements [`Module`] (or
//! [`AsyncModule`] with the `tokio` feature) and calls
//! [`export_module!`](crate::export_module) once. A plugin implements
//! [`Plugin`] and calls [`export_plugin!`](crate::export_plugin).

mod context;
pub(crate) mod logging;

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

#[cfg(test)]
pub(crate) use context::test_host;
pub use context::{
    Attachments, ChannelFds, ContextError, Identity, ModuleContext, PluginTable, Shutdown,
};

/// The error a module or plugin returns: any error type, boxed.
pub type ModuleError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A synchronous module. The worker calls, on its main thread:
/// `start` → `serve` → `stop`, then exits the process.
pub trait Module: Sized + 'static {
    /// Acquires resources and builds the module. May call
    /// [`ModuleContext::ready`] already; otherwise `serve` must.
    fn start(ctx: &ModuleContext) -> Result<Self, ModuleError>;

    /// Serves until [`ModuleContext::shutdown`] is requested (or the work is
    /// done). Must call [`ModuleContext::ready`] unless `start` did, within
    /// the manifest's `limits.start_deadline`.
    fn serve(&mut self, ctx: &ModuleContext) -> Result<(), ModuleError>;

    /// Releases resources; must finish within the stop deadline
    /// ([`Shutdown::remaining`]).
    fn stop(self, ctx: &ModuleContext) -> Result<(), ModuleError> {
        let _ = ctx;
        Ok(())
    }
}

/// An asynchronous module, run on a tokio runtime that the SDK creates
/// inside the worker after the fork: a current-thread runtime on the
/// worker's main thread unless [`AsyncModule::WORKER_THREADS`] asks for
/// more. Export with `export_module!(async MyModule)`.
#[cfg(feature = "tokio")]
pub trait AsyncModule: Sized + 'static {
    /// Worker threads of the module's tokio runtime. `0`, the default, runs
    /// the module on a current-thread runtime: tasks it spawns run
    /// concurrently on the worker's main thread, and no thread has to be
    /// started before the module is up (a multi-threaded runtime costs about
    /// half a millisecond of start-up on a small VM). A module scales out
    /// with replicas, which are processes; set this for CPU-parallel work
    /// inside one instance. `spawn_blocking` works either way.
    const WORKER_THREADS: usize = 0;

    /// As [`Module::start`].
    fn start(ctx: &ModuleContext) -> impl std::future::Future<Output = Result<Self, ModuleError>>;
    /// As [`Module::serve`].
    fn serve(
        &mut self,
        ctx: &ModuleContext,
    ) -> impl std::future::Future<Output = Result<(), ModuleError>>;
    /// As [`Module::stop`].
    fn stop(
        self,
        ctx: &ModuleContext,
    ) -> impl std::future::Future<Output = Result<(), ModuleError>> {
        let _ = ctx;
        async { Ok(()) }
    }
}

/// Adapts an [`AsyncModule`] to [`Module`] by running it on its own tokio
/// runtime.
#[cfg(feature = "tokio")]
pub struct TokioModule<M> {
    rt: tokio::runtime::Runtime,
    module: M,
}

#[cfg(feature = "tokio")]
impl<M: AsyncModule> Module for TokioModule<M> {
    fn start(ctx: &ModuleContext) -> Result<Self, ModuleError> {
        let mut builder = match M::WORKER_THREADS {
            0 => tokio::runtime::Builder::new_current_thread(),
            n => {
                let mut b = tokio::runtime::Builder::new_multi_thread();
                b.worker_threads(n);
                b
            }
        };
        let rt = builder
            .thread_name(format!("{}-rt", ctx.name()))
            .enable_all()
            .build()?;
        let module = rt.block_on(M::start(ctx))?;
        Ok(Self { rt, module })
    }

    fn serve(&mut self, ctx: &ModuleContext) -> Result<(), ModuleError> {
        self.rt.block_on(self.module.serve(ctx))
    }

    fn stop(self, ctx: &ModuleContext) -> Result<(), ModuleError> {
        let Self { rt, module } = self;
        let r = rt.block_on(module.stop(ctx));
        rt.shutdown_timeout(
            ctx.shutdown()
                .remaining()
                .unwrap_or(std::time::Duration::from_secs(1)),
        );
        r
    }
}

/// Renders an error with its `source()` chain: `a: b: c`.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Context handed to [`Plugin::init`] (in the zygote, before any fork).
#[derive(Debug)]
pub struct PluginContext {
    config: toml::Table,
}

impl PluginContext {
    /// The plugin's config table.
    pub fn config(&self) -> &toml::Table {
        &self.config
    }

    /// The config deserialized into `T`.
    pub fn config_as<T: serde::de::DeserializeOwned>(&self) -> Result<T, ContextError> {
        toml::Value::Table(self.config.clone())
            .try_into()
            .map_err(ContextError::Config)
    }

    /// Builds a large read-only table that every worker shares instead of
    /// inheriting it copy-on-write: element `i` is `f(i)`, written straight
    /// into a memfd, which is then sealed against writes and mapped
    /// read-only and shared for the rest of the process.
    ///
    /// Why it matters: a fork copies the page-table entries of every private
    /// page the zygote has touched, so a 200 MiB table in a `Vec` costs each
    /// fork milliseconds and each worker about half a MiB of page tables,
    /// whether or not the module ever reads it. A shared mapping is not
    /// copied at fork (a worker maps the pages it reads, on first touch),
    /// and the seal means no worker (nor the zygote) can change it, so
    /// handing out `&'static [T]` is sound. `T: Copy` has no destructor and
    /// no interior mutability; pointers inside it must point at memory every
    /// worker inherits (the plugin's statics or leaked allocations).
    pub fn share_from_fn<T: Copy + Send + Sync + 'static>(
        &self,
        len: usize,
        f: impl FnMut(usize) -> T,
    ) -> Result<&'static [T], ContextError> {
        shared_table(len, f)
    }

    /// [`PluginContext::share_from_fn`] of a copy of `items`.
    pub fn share_slice<T: Copy + Send + Sync + 'static>(
        &self,
        items: &[T],
    ) -> Result<&'static [T], ContextError> {
        shared_table(items.len(), |i| items[i])
    }
}

fn shared_table<T: Copy + Send + Sync + 'static>(
    len: usize,
    mut f: impl FnMut(usize) -> T,
) -> Result<&'static [T], ContextError> {
    use nix::sys::mman::{mmap, munmap, MapFlags, ProtFlags};
    use shm_ipc::segment::{add_seals, create_memfd};
    let bytes = len
        .checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| ContextError::Io(std::io::Error::other("table size overflows")))?;
    let Some(size) = std::num::NonZeroUsize::new(bytes) else {
        return Ok(&[]);
    };
    // mmap returns page-aligned addresses.
    assert!(
        std::mem::align_of::<T>() <= 4096,
        "element alignment above a page"
    );
    let fd = create_memfd(c"ember-plugin-table", bytes as u64).map_err(ContextError::SharedData)?;
    // SAFETY: a fresh memfd of `bytes` bytes, mapped shared and writable;
    // nothing else maps it yet, and the mapping is unmapped before sealing.
    let w = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ | ProtFlags::PROT_WRITE,
            MapFlags::MAP_SHARED,
            &fd,
            0,
        )
    }
    .map_err(|e| ContextError::Io(e.into()))?;
    let base = w.as_ptr().cast::<T>();
    for i in 0..len {
        // SAFETY: i < len, so the element lies inside the mapping; the
        // mapping is page-aligned, hence aligned for T.
        unsafe { base.add(i).write(f(i)) };
    }
    // SAFETY: `w` is the mapping made above, of `size` bytes, and nothing
    // refers to it any more.
    unsafe { munmap(w, size.get()) }.map_err(|e| ContextError::Io(e.into()))?;
    use nix::fcntl::SealFlag;
    add_seals(
        std::os::fd::AsFd::as_fd(&fd),
        SealFlag::F_SEAL_SHRINK
            | SealFlag::F_SEAL_GROW
            | SealFlag::F_SEAL_WRITE
            | SealFlag::F_SEAL_SEAL,
    )
    .map_err(ContextError::SharedData)?;
    // SAFETY: the sealed memfd, mapped read-only and shared; its content
    // can no longer change (F_SEAL_WRITE forbids writable mappings and
    // write(2) to everyone).
    let r = unsafe {
        mmap(
            None,
            size,
            ProtFlags::PROT_READ,
            MapFlags::MAP_SHARED,
            &fd,
            0,
        )
    }
    .map_err(|e| ContextError::Io(e.into()))?;
    // The mapping outlives the descriptor (closed here) and is never
    // unmapped.
    drop(fd);
    // SAFETY: `len` initialized values of T (written above) in a mapping
    // that stays for the process lifetime and that no one can write.
    Ok(unsafe { std::slice::from_raw_parts(r.as_ptr().cast::<T>(), len) })
}

/// A plugin: initialized once in the zygote, then called in-process by
/// modules through its `#[repr(C)]` [`PluginTable`].
///
/// `init` must not leave threads running (the zygote forks afterwards).
/// Descriptors it opens stay open in every worker at the same numbers, and
/// `pthread_atfork` handlers it registers run at each fork (`docs/abi.md`
/// §3). Logging works during `init` only;
/// afterwards a panic is reported on stderr (the instance's log in a
/// worker). The table's `extern "C"` functions must not let a panic unwind:
/// wrap each body in [`ffi_guard`].
pub trait Plugin: 'static {
    /// The plugin's semver version.
    const VERSION: &'static str;
    /// Its table type (which carries the name and table version).
    type Table: PluginTable;
    /// Does the slow work and returns the table, which must live for the
    /// rest of the process.
    fn init(ctx: &PluginContext) -> Result<&'static Self::Table, ModuleError>;
}

thread_local! {
    /// The last panic's message and location on this thread, recorded by
    /// the panic hook for the `catch_unwind` that follows on the same thread
    /// (a global slot would let a panic in another thread, e.g. one caught
    /// by tokio, overwrite it).
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
    /// How many [`ffi_guard`]s are active on this thread: while one is, the
    /// hook only records the panic and the guard reports it, naming the
    /// entry point.
    static IN_FFI_GUARD: Cell<u32> = const { Cell::new(0) };
}

fn install_panic_hook() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            let msg = payload_message(info.payload());
            let full = match info.location() {
                Some(l) => format!("{msg} (at {}:{})", l.file(), l.line()),
                None => msg,
            };
            // `try_with`: a panic in a thread-local destructor must not
            // turn into a double panic here.
            if IN_FFI_GUARD.try_with(Cell::get).unwrap_or(0) == 0 {
                report_panic(&format!(
                    "thread '{}' panicked: {full}",
                    current_thread_name()
                ));
            }
            let _ = LAST_PANIC.try_with(|l| *l.borrow_mut() = Some(full));
        }));
    });
}

fn current_thread_name() -> String {
    std::thread::current()
        .name()
        .map(str::to_owned)
        .unwrap_or_else(|| "unnamed".into())
}

/// Reports a panic where someone will read it: through `tracing` when this
/// artifact's forwarding subscriber is active on this thread (a module after
/// `start`, a plugin during `init`: the record reaches the supervisor's
/// module log), otherwise on stderr, which the worker points at the
/// instance's log file (the `Stdio` grant, `docs/abi.md` §4). A plugin's
/// table functions run after `init`, with no subscriber of the plugin's own
/// (the module's `tracing` is a separate copy), so theirs go to stderr.
fn report_panic(text: &str) {
    if tracing::dispatcher::get_default(|d| d.is::<logging::Forward>()) {
        tracing::error!(target: "ember::panic", "{text}");
    } else {
        use std::io::Write as _;
        // One write per line, so concurrent reports do not interleave.
        let line = format!("ember::panic: {text}\n");
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }
}

fn payload_message(p: &(dyn Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn panic_message(p: &(dyn Any + Send)) -> String {
    LAST_PANIC
        .try_with(|l| l.borrow_mut().take())
        .ok()
        .flatten()
        .unwrap_or_else(|| payload_message(p))
}

/// Runs `f` for an `extern "C"` entry point, such as a function of a
/// plugin's table, and turns a panic into `fallback`.
///
/// A panic must never unwind out of an `extern "C"` function: Rust aborts
/// the process there, which for a plugin function kills the worker of the
/// module that called it, and the message is easily lost (a plugin has no
/// `tracing` subscriber after `init`). With the guard, the panic is caught
/// and reported once, naming `entry`, with its message, source location and
/// thread: on stderr, which the worker points at the instance's log file,
/// or through `tracing` where this artifact's forwarding is active (a
/// module's own callbacks). The caller gets `fallback` (make it a value the
/// caller can tell apart, e.g. `false` for "not found", or an error code).
///
/// ```
/// use module_runtime::ffi_guard;
///
/// unsafe extern "C" fn ratio(a: u64, b: u64) -> u64 {
///     ffi_guard("example.ratio", u64::MAX, || a / b)
/// }
///
/// // SAFETY: plain values in and out.
/// assert_eq!(unsafe { ratio(6, 3) }, 2);
/// assert_eq!(unsafe { ratio(1, 0) }, u64::MAX); // reported, not aborted
/// ```
///
/// State `f` shared with other calls may be half-updated after a panic
/// (`f` is treated as unwind-safe); plugin tables are usually read-only.
/// Panics with `panic = "abort"` cannot be caught: build plugins with the
/// default `panic = "unwind"`. The SDK's panic hook (installed by
/// `export_plugin!`'s `init` and `export_module!`'s `start`) supplies the
/// source location; without it the report carries the message only.
pub fn ffi_guard<R>(entry: &str, fallback: R, f: impl FnOnce() -> R) -> R {
    IN_FFI_GUARD.with(|d| d.set(d.get() + 1));
    let r = catch_unwind(AssertUnwindSafe(f));
    IN_FFI_GUARD.with(|d| d.set(d.get().saturating_sub(1)));
    match r {
        Ok(v) => v,
        Err(p) => {
            let msg = panic_message(&*p);
            report_panic(&format!(
                "`{entry}` panicked on thread '{}': {msg}; returned the fallback value",
                current_thread_name()
            ));
            fallback
        }
    }
}

/// Support code for the export macros. Not a stable API.
#[doc(hidden)]
pub mod __private {
    use super::*;
    use crate::abi::{
        self, DescriptorHeader, FfiStr, HostApi, ModuleDescriptor, PluginDescriptor, PluginHostApi,
    };
    use std::sync::atomic::{AtomicPtr, Ordering};

    /// Bytes of a `HostApi` up to and including `error`: a host whose
    /// struct is at least this long can be told why it is refused.
    const HOST_API_REPORTABLE: usize =
        std::mem::offset_of!(HostApi, error) + std::mem::size_of::<usize>();
    /// The same for `PluginHostApi`.
    const PLUGIN_HOST_API_REPORTABLE: usize =
        std::mem::offset_of!(PluginHostApi, error) + std::mem::size_of::<usize>();

    /// Why a host's API struct cannot be used by this artifact, if it
    /// cannot: another ABI version, or shorter than the struct we know.
    /// The host's `HostApi` as a whole struct. A host of this ABI version
    /// whose struct ends before a field added since (`attach_seq`) is copied
    /// into a full one with that field null, once, so no reference ever
    /// covers bytes the host did not provide.
    ///
    /// # Safety
    /// `host` points to `size` bytes of a valid `HostApi` prefix, valid for
    /// the process lifetime, and `size >= HOST_API_MIN_SIZE`.
    unsafe fn full_host_api(host: *const HostApi, size: u32) -> &'static HostApi {
        if size as usize >= std::mem::size_of::<HostApi>() {
            // SAFETY: the whole struct is there (caller contract).
            return unsafe { &*host };
        }
        let mut full = std::mem::MaybeUninit::<HostApi>::zeroed();
        // SAFETY: the host provides at least HOST_API_MIN_SIZE bytes (the
        // caller checked); the destination is a whole HostApi.
        unsafe {
            std::ptr::copy_nonoverlapping(
                host.cast::<u8>(),
                full.as_mut_ptr().cast::<u8>(),
                abi::HOST_API_MIN_SIZE,
            )
        };
        // SAFETY: every field before `attach_seq` was copied from a valid
        // HostApi of this ABI version; `attach_seq` (the only field after
        // them) is a raw pointer, for which all-zero bytes are null, and
        // consumers read it only when `size` covers it (it does not here).
        Box::leak(Box::new(unsafe { full.assume_init() }))
    }

    fn host_mismatch(what: &str, abi_version: u32, size: u32, ours: usize) -> Option<String> {
        if abi_version != abi::ABI_VERSION {
            Some(format!(
                "the host passed a {what} for Ember ABI version {abi_version}, this artifact \
                 was built for version {} (module-runtime {})",
                abi::ABI_VERSION,
                abi::SDK_VERSION
            ))
        } else if (size as usize) < ours {
            Some(format!(
                "the host passed a {what} of {size} bytes, this artifact needs {ours} \
                 (ABI version {})",
                abi::ABI_VERSION
            ))
        } else {
            None
        }
    }

    struct Instance<M> {
        module: Option<M>,
        ctx: ModuleContext,
    }

    /// Runs `f`, mapping errors and panics to `CALL_*` codes reported through `report`.
    fn guarded(report: &dyn Fn(&str), f: impl FnOnce() -> Result<(), ModuleError>) -> i32 {
        match catch_unwind(AssertUnwindSafe(f)) {
            Ok(Ok(())) => abi::CALL_OK,
            Ok(Err(e)) => {
                report(&error_chain(&*e));
                abi::CALL_ERROR
            }
            Err(p) => {
                report(&panic_message(&*p));
                abi::CALL_PANIC
            }
        }
    }

    /// `ModuleDescriptor::start` for `M`.
    ///
    /// # Safety
    /// Called by the worker with its process-lifetime `HostApi` and a valid
    /// out-pointer.
    pub unsafe extern "C" fn start<M: Module>(
        host: *const HostApi,
        instance: *mut *mut c_void,
    ) -> i32 {
        if host.is_null() || instance.is_null() {
            return abi::CALL_ERROR;
        }
        // SAFETY: non-null and valid for the process lifetime (caller
        // contract); `abi_version` and `size` keep their offsets in every
        // ABI version (docs/abi.md, "Versioning rule"). Read through the raw
        // pointer: no reference is made before the size is known.
        let (abi_version, size) = unsafe {
            (
                std::ptr::addr_of!((*host).abi_version).read(),
                std::ptr::addr_of!((*host).size).read(),
            )
        };
        // The ABI check happens before any other callback is used.
        if let Some(why) = host_mismatch("HostApi", abi_version, size, abi::HOST_API_MIN_SIZE) {
            if size as usize >= HOST_API_REPORTABLE {
                // SAFETY: `ctx` and `error` keep their offsets and types in
                // every ABI version, and `size` says the host's struct
                // reaches past `error`.
                unsafe {
                    let error = std::ptr::addr_of!((*host).error).read();
                    let ctx = std::ptr::addr_of!((*host).ctx).read();
                    error(ctx, FfiStr::new(&why));
                }
            }
            return abi::CALL_ERROR;
        }
        // SAFETY: the check passed: `size` bytes of a valid `HostApi`,
        // at least `HOST_API_MIN_SIZE`, valid for the process lifetime.
        let host: &'static HostApi = unsafe { full_host_api(host, size) };
        let h = context::Host(host);
        let report = |m: &str| h.error(m);
        let mut out: *mut c_void = std::ptr::null_mut();
        let rc = guarded(&report, || {
            install_panic_hook();
            let sink_host = h;
            let sub = logging::Forward::new(
                Box::new(move |l, t, m| sink_host.log(l, t, m)),
                tracing::Level::DEBUG,
            );
            // A second module in one process is impossible; ignore "already set".
            let _ = tracing::subscriber::set_global_default(sub);
            // SAFETY: `host` is the worker's HostApi (caller contract); its
            // grants are handed to us exactly once, here.
            let ctx = unsafe { ModuleContext::from_host(host) }?;
            let module = M::start(&ctx)?;
            out = Box::into_raw(Box::new(Instance {
                module: Some(module),
                ctx,
            }))
            .cast();
            Ok(())
        });
        // SAFETY: `instance` is a valid out-pointer (caller contract).
        unsafe { *instance = out };
        rc
    }

    /// `ModuleDescriptor::serve` for `M`.
    ///
    /// # Safety
    /// `instance` must come from a successful `start::<M>` and not be stopped.
    pub unsafe extern "C" fn serve<M: Module>(instance: *mut c_void) -> i32 {
        if instance.is_null() {
            return abi::CALL_ERROR;
        }
        // SAFETY: created by `start::<M>` and only used from the worker's
        // main thread, one call at a time.
        let inst = unsafe { &mut *instance.cast::<Instance<M>>() };
        let h = inst.ctx.host();
        guarded(&|m| h.error(m), || match inst.module.as_mut() {
            Some(m) => m.serve(&inst.ctx),
            None => Err("module already stopped".into()),
        })
    }

    /// `ModuleDescriptor::stop` for `M`.
    ///
    /// # Safety
    /// As for `serve`; the instance is consumed.
    pub unsafe extern "C" fn stop<M: Module>(instance: *mut c_void) -> i32 {
        if instance.is_null() {
            return abi::CALL_ERROR;
        }
        // SAFETY: created by `start::<M>`; ownership returns to us here and
        // the worker never uses the pointer again.
        let inst = unsafe { Box::from_raw(instance.cast::<Instance<M>>()) };
        let h = inst.ctx.host();
        let Instance { module, ctx } = *inst;
        let rc = guarded(&|m| h.error(m), || match module {
            Some(m) => m.stop(&ctx),
            None => Ok(()),
        });
        // The context (and the descriptors still in it) are released with
        // the process; forgetting avoids running destructors after a panic.
        std::mem::forget(ctx);
        rc
    }

    /// The descriptor for `M`.
    pub const fn descriptor<M: Module>(type_name: &'static str) -> ModuleDescriptor {
        ModuleDescriptor {
            header: DescriptorHeader {
                magic: abi::MODULE_MAGIC,
                abi_version: abi::ABI_VERSION,
                size: std::mem::size_of::<ModuleDescriptor>() as u32,
            },
            sdk_version: FfiStr::new(abi::SDK_VERSION),
            module_type: FfiStr::new(type_name),
            start: start::<M>,
            serve: serve::<M>,
            stop: stop::<M>,
        }
    }

    /// `PluginDescriptor::init` body for `P`, storing the table in `slot`.
    ///
    /// # Safety
    /// `host` must be valid for the duration of the call.
    pub unsafe fn plugin_init<P: Plugin>(
        host: *const PluginHostApi,
        slot: &AtomicPtr<c_void>,
    ) -> i32 {
        if host.is_null() {
            return abi::CALL_ERROR;
        }
        // SAFETY: valid for this call (caller contract); the frozen fields
        // are read through the raw pointer until the size is known.
        let (abi_version, size) = unsafe {
            (
                std::ptr::addr_of!((*host).abi_version).read(),
                std::ptr::addr_of!((*host).size).read(),
            )
        };
        if let Some(why) = host_mismatch(
            "PluginHostApi",
            abi_version,
            size,
            std::mem::size_of::<PluginHostApi>(),
        ) {
            if size as usize >= PLUGIN_HOST_API_REPORTABLE {
                // SAFETY: as in `start`: `ctx` and `error` are frozen, and
                // the host's struct reaches past `error`.
                unsafe {
                    let error = std::ptr::addr_of!((*host).error).read();
                    let ctx = std::ptr::addr_of!((*host).ctx).read();
                    error(ctx, FfiStr::new(&why));
                }
            }
            return abi::CALL_ERROR;
        }
        // SAFETY: the whole struct is there (checked) and valid for the call.
        let host = unsafe { &*host };
        // SAFETY: host callbacks are valid during `init`.
        let report = |m: &str| unsafe { (host.error)(host.ctx, FfiStr::new(m)) };
        let log_fn = host.log;
        let ctx_ptr = host.ctx as usize;
        guarded(&report, || {
            install_panic_hook();
            // SAFETY: the host's config string is valid during `init`.
            let text = unsafe { host.config_toml.to_string_lossy() };
            let config: toml::Table = toml::from_str(&text)?;
            let sub = logging::Forward::new(
                Box::new(move |l, t, m| {
                    // SAFETY: this subscriber is only installed for the
                    // duration of `init`, while the host's callbacks are valid.
                    unsafe { log_fn(ctx_ptr as *const c_void, l, FfiStr::new(t), FfiStr::new(m)) }
                }),
                tracing::Level::DEBUG,
            );
            let table =
                tracing::subscriber::with_default(sub, || P::init(&PluginContext { config }))?;
            // Release: pairs with the Acquire load in the table getter.
            slot.store(
                (table as *const P::Table).cast_mut().cast(),
                Ordering::Release,
            );
            Ok(())
        })
    }

    /// The descriptor for plugin `P`.
    pub const fn plugin_descriptor<P: Plugin>(
        init: unsafe extern "C" fn(*const PluginHostApi) -> i32,
        table: unsafe extern "C" fn() -> *const c_void,
    ) -> PluginDescriptor {
        PluginDescriptor {
            header: DescriptorHeader {
                magic: abi::PLUGIN_MAGIC,
                abi_version: abi::ABI_VERSION,
                size: std::mem::size_of::<PluginDescriptor>() as u32,
            },
            sdk_version: FfiStr::new(abi::SDK_VERSION),
            name: FfiStr::new(<P::Table as PluginTable>::NAME),
            version: FfiStr::new(P::VERSION),
            table_version: <P::Table as PluginTable>::TABLE_VERSION,
            table_size: std::mem::size_of::<P::Table>() as u32,
            init,
            table,
        }
    }
}

/// Exports a module: `export_module!(MyModule)` for a [`Module`],
/// `export_module!(async MyModule)` for an [`AsyncModule`] (feature `tokio`).
/// Generates the one exported symbol, `ember_module_descriptor`.
#[macro_export]
macro_rules! export_module {
    (@emit $ty:ty, $name:expr) => {
        /// The Ember module descriptor (generated by `export_module!`).
        #[unsafe(no_mangle)]
        pub extern "C" fn ember_module_descriptor() -> *const $crate::abi::ModuleDescriptor {
            static DESCRIPTOR: $crate::abi::ModuleDescriptor = $crate::sdk::__private::descriptor::<$ty>($name);
            &DESCRIPTOR
        }
    };
    (async $ty:ty) => {
        $crate::export_module!(@emit $crate::sdk::TokioModule<$ty>, stringify!($ty));
    };
    ($ty:ty) => {
        $crate::export_module!(@emit $ty, stringify!($ty));
    };
}

/// Exports a plugin: `export_plugin!(MyPlugin)` for a [`Plugin`]. Generates
/// the one exported symbol, `ember_plugin_descriptor`.
#[macro_export]
macro_rules! export_plugin {
    ($ty:ty) => {
        const _: () = {
            static TABLE: ::std::sync::atomic::AtomicPtr<::std::ffi::c_void> =
                ::std::sync::atomic::AtomicPtr::new(::std::ptr::null_mut());
            unsafe extern "C" fn init(host: *const $crate::abi::PluginHostApi) -> i32 {
                // SAFETY: forwarded from the host's call, same contract.
                unsafe { $crate::sdk::__private::plugin_init::<$ty>(host, &TABLE) }
            }
            unsafe extern "C" fn table() -> *const ::std::ffi::c_void {
                // Acquire: pairs with the Release store in `plugin_init`.
                TABLE.load(::std::sync::atomic::Ordering::Acquire)
            }
            static DESCRIPTOR: $crate::abi::PluginDescriptor =
                $crate::sdk::__private::plugin_descriptor::<$ty>(init, table);
            /// The Ember plugin descriptor (generated by `export_plugin!`).
            #[unsafe(no_mangle)]
            pub extern "C" fn ember_plugin_descriptor() -> *const $crate::abi::PluginDescriptor {
                &DESCRIPTOR
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_tables_hold_their_values_and_cannot_be_made_writable() {
        let ctx = PluginContext {
            config: toml::Table::new(),
        };
        let t: &'static [u64] = ctx.share_from_fn(100_000, |i| i as u64 * 3).unwrap();
        assert_eq!(t.len(), 100_000);
        assert!(t.iter().enumerate().all(|(i, &v)| v == i as u64 * 3));
        // The mapping is read-only and shared, and the memfd behind it is
        // sealed: no one can make it writable again.
        let addr = std::ptr::NonNull::new(t.as_ptr() as *mut std::ffi::c_void).unwrap();
        // SAFETY: mprotect on our own mapping; it is expected to fail, and
        // if it did not, nothing writes through it.
        let r = unsafe {
            nix::sys::mman::mprotect(
                addr,
                std::mem::size_of_val(t),
                nix::sys::mman::ProtFlags::PROT_READ | nix::sys::mman::ProtFlags::PROT_WRITE,
            )
        };
        assert_eq!(r, Err(nix::errno::Errno::EACCES));
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let start = format!("{:x}-", t.as_ptr() as usize);
        let line = maps.lines().find(|l| l.starts_with(&start)).unwrap();
        assert!(
            line.contains(" r--s ") && line.contains("memfd:ember-plugin-table"),
            "{line}"
        );
        // Empty tables need no mapping.
        assert!(ctx.share_slice::<u64>(&[]).unwrap().is_empty());
        assert_eq!(ctx.share_slice(&[7u8, 8, 9]).unwrap(), &[7, 8, 9]);
    }

    #[test]
    fn ffi_guard_turns_a_panic_into_the_fallback() {
        assert_eq!(ffi_guard("t.ok", 0u64, || 7), 7);
        let r = ffi_guard("t.boom", u64::MAX, || -> u64 {
            panic!("boom in a table fn")
        });
        assert_eq!(r, u64::MAX);
        // The guard is balanced after a panic, and nests.
        assert_eq!(IN_FFI_GUARD.with(Cell::get), 0);
        assert!(!ffi_guard("t.outer", true, || ffi_guard(
            "t.inner",
            false,
            || panic!("x")
        )));
        assert_eq!(IN_FFI_GUARD.with(Cell::get), 0);
    }

    mod host_abi {
        use crate::abi::{self, FfiStr, HostApi};
        use std::ffi::c_void;
        use std::sync::Mutex;

        static ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

        unsafe extern "C" fn ready(_: *const c_void) {}
        unsafe extern "C" fn log(_: *const c_void, _: u32, _: FfiStr, _: FfiStr) {}
        unsafe extern "C" fn error(_: *const c_void, m: FfiStr) {
            // SAFETY: the artifact passes a string valid for the call.
            ERRORS.lock().unwrap().push(unsafe { m.to_string_lossy() });
        }
        unsafe extern "C" fn remaining(_: *const c_void) -> i64 {
            -1
        }
        unsafe extern "C" fn lookup(
            _: *const c_void,
            _: FfiStr,
            _: u32,
            _: *mut abi::PluginRef,
        ) -> i32 {
            abi::LOOKUP_NOT_FOUND
        }
        unsafe extern "C" fn take(_: *const c_void, _: *mut abi::FfiGrant, _: usize) -> usize {
            0
        }

        fn host(abi_version: u32, size: u32) -> HostApi {
            HostApi {
                abi_version,
                size,
                ctx: std::ptr::null(),
                module_name: FfiStr::new("m"),
                module_version: FfiStr::new("1.0.0"),
                replica: 0,
                config_toml: FfiStr::new(""),
                grants: std::ptr::null(),
                grants_len: 0,
                shutdown_fd: -1,
                ready,
                log,
                error,
                shutdown_remaining_ms: remaining,
                plugin_lookup: lookup,
                attach_fd: -1,
                take_attached: take,
                attach_seq: std::ptr::null(),
            }
        }

        struct Never;
        impl crate::Module for Never {
            fn start(_: &crate::ModuleContext) -> Result<Self, crate::ModuleError> {
                unreachable!("start must not run for a mismatched host")
            }
            fn serve(&mut self, _: &crate::ModuleContext) -> Result<(), crate::ModuleError> {
                Ok(())
            }
        }

        fn start(h: &HostApi) -> (i32, Vec<String>) {
            ERRORS.lock().unwrap().clear();
            let mut inst = std::ptr::null_mut();
            // SAFETY: `h` and `inst` are valid for the call; the mismatch
            // is detected before anything else is read.
            let rc = unsafe { super::super::__private::start::<Never>(h, &mut inst) };
            assert!(inst.is_null());
            (rc, std::mem::take(&mut *ERRORS.lock().unwrap()))
        }

        #[test]
        fn a_module_says_why_it_refuses_the_host() {
            let full = std::mem::size_of::<HostApi>() as u32;
            let (rc, errs) = start(&host(2, full));
            assert_eq!(rc, abi::CALL_ERROR);
            assert_eq!(errs.len(), 1, "{errs:?}");
            assert!(
                errs[0].contains("HostApi for Ember ABI version 2")
                    && errs[0].contains("built for version 1"),
                "{errs:?}"
            );
            // Same version, but shorter than the struct we know: still
            // long enough to reach `error`.
            let (rc, errs) = start(&host(abi::ABI_VERSION, 120));
            assert_eq!(rc, abi::CALL_ERROR);
            assert!(
                errs[0].contains("of 120 bytes, this artifact needs"),
                "{errs:?}"
            );
            // Too short to reach `error`: refused without a callback.
            let (rc, errs) = start(&host(abi::ABI_VERSION, 16));
            assert_eq!((rc, errs.len()), (abi::CALL_ERROR, 0));
        }
    }
}
