//! Types shared by the Ember examples: the `kv` service's messages and the
//! `catalog` plugin's C-ABI table.

use module_runtime::PluginTable;

/// Name of the kv service in manifests.
pub const KV_SERVICE: &str = "kv";
/// Schema version of [`KvRequest`] / [`KvResponse`].
pub const KV_VERSION: u32 = 1;

/// A request to the kv service.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum KvRequest {
    /// Read a key.
    Get {
        /// The key.
        key: String,
    },
    /// Write a key.
    Put {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// Remove a key.
    Delete {
        /// The key.
        key: String,
    },
}

/// The kv service's reply.
#[derive(Debug, Clone, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub enum KvResponse {
    /// Value of a `Get` (none if absent).
    Value(Option<String>),
    /// A `Put` or `Delete` was applied.
    Done,
    /// The request was refused.
    Error(String),
}

/// One catalog row, 64 bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CatalogEntry {
    /// Item id (its index).
    pub id: u64,
    /// Price in cents.
    pub price_cents: u64,
    /// NUL-padded UTF-8 name.
    pub name: [u8; 48],
}

impl CatalogEntry {
    /// The name as text.
    pub fn name(&self) -> &str {
        let end = self
            .name
            .iter()
            .position(|b| *b == 0)
            .unwrap_or(self.name.len());
        std::str::from_utf8(&self.name[..end]).unwrap_or("?")
    }
}

/// The catalog plugin's function table (table version 1).
#[repr(C)]
pub struct CatalogTable {
    /// Number of entries.
    pub len: unsafe extern "C" fn() -> u64,
    /// Copies entry `id` into `*out`; false if out of range.
    pub lookup: unsafe extern "C" fn(id: u64, out: *mut CatalogEntry) -> bool,
    /// Sum of the prices of entries `[start, start+count)`.
    pub price_sum: unsafe extern "C" fn(start: u64, count: u64) -> u64,
    /// Pid of the process that ran `init` (the zygote).
    pub init_pid: unsafe extern "C" fn() -> u32,
}

// SAFETY: `CatalogTable` is `#[repr(C)]` and is exactly the table the catalog
// plugin publishes under name "catalog", table version 1.
unsafe impl PluginTable for CatalogTable {
    const NAME: &'static str = "catalog";
    const TABLE_VERSION: u32 = 1;
}

impl CatalogTable {
    /// Number of entries.
    pub fn len(&self) -> u64 {
        // SAFETY: the plugin was initialized in the zygote before this
        // table could be looked up; the function takes no pointers.
        unsafe { (self.len)() }
    }

    /// Whether the catalog is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Entry `id`, if any.
    pub fn get(&self, id: u64) -> Option<CatalogEntry> {
        let mut out = CatalogEntry {
            id: 0,
            price_cents: 0,
            name: [0; 48],
        };
        // SAFETY: `out` is a valid, writable CatalogEntry for the call.
        unsafe { (self.lookup)(id, &mut out) }.then_some(out)
    }

    /// Pid of the process where the plugin was initialized.
    pub fn init_pid(&self) -> u32 {
        // SAFETY: no arguments; returns a plain value.
        unsafe { (self.init_pid)() }
    }

    /// Sum of prices over a range (reads the table, copies nothing).
    pub fn price_sum(&self, start: u64, count: u64) -> u64 {
        // SAFETY: plain values in and out.
        unsafe { (self.price_sum)(start, count) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rkyv::rancor::Error;

    #[test]
    fn kv_messages_round_trip_through_rkyv() {
        let req = KvRequest::Put {
            key: "a".into(),
            value: "b".into(),
        };
        let bytes = rkyv::to_bytes::<Error>(&req).unwrap();
        let back: KvRequest = rkyv::from_bytes::<KvRequest, Error>(&bytes).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn entry_is_64_bytes_and_names_decode() {
        assert_eq!(std::mem::size_of::<CatalogEntry>(), 64);
        let mut e = CatalogEntry {
            id: 1,
            price_cents: 2,
            name: [0; 48],
        };
        e.name[..3].copy_from_slice(b"abc");
        assert_eq!(e.name(), "abc");
    }
}
