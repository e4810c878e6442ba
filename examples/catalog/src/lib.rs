//! The catalog plugin: builds a large in-memory table once, in the zygote,
//! before any worker is forked; every worker then reads it in-process
//! through [`example_schema::CatalogTable`]. The table lives in a sealed,
//! shared, read-only mapping ([`PluginContext::share_from_fn`]), so forking
//! a worker does not copy its page tables and no module can change it.
//!
//! Config (`[plugins.catalog]` in the base, or the TOML file given to the
//! test zygote): `size_mb` (default 200) and `extra_init_ms` (default 300, a
//! stand-in for parsing, warming caches, talking to a config server).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;

use example_schema::{CatalogEntry, CatalogTable};
use module_runtime::sdk::{Plugin, PluginContext};
use module_runtime::{export_plugin, ffi_guard, tracing, ModuleError};

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_size")]
    size_mb: u64,
    #[serde(default = "default_extra")]
    extra_init_ms: u64,
}

fn default_size() -> u64 {
    200
}

fn default_extra() -> u64 {
    300
}

static ENTRIES: OnceLock<&'static [CatalogEntry]> = OnceLock::new();

fn entries() -> &'static [CatalogEntry] {
    ENTRIES.get().copied().unwrap_or(&[])
}

// Every table function is an `extern "C"` entry point called in-process by
// modules: `ffi_guard` keeps a panic (a bug here) from aborting the calling
// worker, reports it on the instance's log, and returns a value the caller
// reads as "nothing".

unsafe extern "C" fn len() -> u64 {
    ffi_guard("catalog.len", 0, || entries().len() as u64)
}

unsafe extern "C" fn lookup(id: u64, out: *mut CatalogEntry) -> bool {
    ffi_guard("catalog.lookup", false, || {
        match usize::try_from(id).ok().and_then(|i| entries().get(i)) {
            Some(e) if !out.is_null() => {
                // SAFETY: the caller passes a valid, writable CatalogEntry.
                unsafe { out.write(*e) };
                true
            }
            _ => false,
        }
    })
}

unsafe extern "C" fn price_sum(start: u64, count: u64) -> u64 {
    ffi_guard("catalog.price_sum", 0, || {
        let e = entries();
        let s = usize::try_from(start).unwrap_or(usize::MAX).min(e.len());
        let n = usize::try_from(count)
            .unwrap_or(usize::MAX)
            .min(e.len() - s);
        e[s..s + n].iter().map(|x| x.price_cents).sum()
    })
}

static INIT_PID: AtomicU32 = AtomicU32::new(0);

unsafe extern "C" fn init_pid() -> u32 {
    // Relaxed: written once in `init`, before any fork or lookup.
    ffi_guard("catalog.init_pid", 0, || INIT_PID.load(Ordering::Relaxed))
}

static TABLE: CatalogTable = CatalogTable {
    len,
    lookup,
    price_sum,
    init_pid,
};

/// Price of item `i`: a cheap deterministic hash.
fn price(i: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) % 100_000
}

/// The catalog plugin.
pub struct Catalog;

impl Plugin for Catalog {
    const VERSION: &'static str = "1.0.0";
    type Table = CatalogTable;

    fn init(ctx: &PluginContext) -> Result<&'static CatalogTable, ModuleError> {
        let cfg: Config = ctx.config_as()?;
        let n = usize::try_from((cfg.size_mb << 20) / std::mem::size_of::<CatalogEntry>() as u64)?;
        let t0 = std::time::Instant::now();
        let v = ctx.share_from_fn(n, |i| {
            let i = i as u64;
            let mut name = [0u8; 48];
            let s = format!("item-{i:010}");
            name[..s.len()].copy_from_slice(s.as_bytes());
            CatalogEntry {
                id: i,
                price_cents: price(i),
                name,
            }
        })?;
        std::thread::sleep(std::time::Duration::from_millis(cfg.extra_init_ms));
        ENTRIES.set(v).map_err(|_| "catalog initialized twice")?;
        INIT_PID.store(std::process::id(), Ordering::Relaxed);
        tracing::info!(
            entries = n,
            size_mb = cfg.size_mb,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "catalog built"
        );
        Ok(&TABLE)
    }
}

export_plugin!(Catalog);
