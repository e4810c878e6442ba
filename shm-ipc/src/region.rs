//! The raw layer: a mapping of a shared segment and the only code that turns
//! offsets into pointers.
//!
//! Memory another process can write is never exposed as `&T` or `&[u8]`.
//! Words are read through atomics; bytes are copied out (or in) through raw
//! pointers into private buffers, the same way a kernel's `copy_from_user`
//! treats user memory: the bytes may be garbage, but once copied they are
//! ours. Every access is bounds-checked against the mapping length, which is
//! fixed when the mapping is made and backed by a segment sealed against
//! shrinking, so no access can fault.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU32, AtomicU64};

use memmap2::{MmapOptions, MmapRaw};

/// A shared mapping of a whole segment (read-write or read-only).
#[derive(Debug)]
pub(crate) struct Region {
    map: MmapRaw,
}

impl Region {
    /// Maps `len` bytes of `fd` shared and read-write, pre-faulting every page.
    pub(crate) fn map_rw(fd: impl AsFd, len: usize) -> std::io::Result<Self> {
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(&fd.as_fd())?;
        Ok(Self { map })
    }

    /// Maps `len` bytes of `fd` shared and read-only.
    pub(crate) fn map_ro(fd: impl AsFd, len: usize) -> std::io::Result<Self> {
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw_read_only(&fd.as_fd())?;
        Ok(Self { map })
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    fn check(&self, off: usize, size: usize, align: usize) {
        let end = off.checked_add(size);
        assert!(
            end.is_some_and(|e| e <= self.len()) && off % align == 0,
            "shared-memory access out of bounds: off {off} size {size} len {}",
            self.len()
        );
    }

    /// The 32-bit atomic word at `off`.
    ///
    /// # Panics
    /// If `off` is misaligned or out of bounds: offsets come from this crate's
    /// own layout code, never from a peer, so that is a bug here.
    pub(crate) fn u32_at(&self, off: usize) -> &AtomicU32 {
        self.check(off, 4, 4);
        // SAFETY: the range is inside the live mapping (checked above) and
        // 4-aligned (mappings are page-aligned, off % 4 == 0). AtomicU32 has
        // the layout of u32 and tolerates concurrent writes from any process,
        // so a shared reference to it is sound for as long as `self` lives.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU32) }
    }

    /// The 64-bit atomic word at `off` (see [`Region::u32_at`]).
    pub(crate) fn u64_at(&self, off: usize) -> &AtomicU64 {
        self.check(off, 8, 8);
        // SAFETY: as in `u32_at`, for an 8-aligned in-bounds AtomicU64.
        unsafe { &*(self.map.as_ptr().add(off) as *const AtomicU64) }
    }

    /// Copies `dst.len()` bytes at `off` out of the mapping.
    pub(crate) fn copy_out(&self, off: usize, dst: &mut [u8]) {
        self.check(off, dst.len(), 1);
        // SAFETY: the source range is inside the mapping (checked above) and
        // cannot alias `dst`, which is private memory. The source may change
        // while we copy; we only ever copy bytes (no invalid values exist for
        // u8) and never create a reference to the shared range.
        unsafe {
            std::ptr::copy_nonoverlapping(self.map.as_ptr().add(off), dst.as_mut_ptr(), dst.len())
        }
    }

    /// Copies `src` into the mapping at `off`.
    pub(crate) fn copy_in(&self, off: usize, src: &[u8]) {
        self.check(off, src.len(), 1);
        // SAFETY: the destination range is inside a writable mapping (only
        // writable regions are ever written: callers hold a `map_rw` region)
        // and cannot alias the private `src`. No reference to shared memory
        // is created.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.map.as_mut_ptr().add(off), src.len())
        }
    }

    /// Fills `len` bytes at `off` with `byte`.
    pub(crate) fn fill(&self, off: usize, len: usize, byte: u8) {
        self.check(off, len, 1);
        // SAFETY: in-bounds range of a writable mapping, no reference created.
        unsafe { std::ptr::write_bytes(self.map.as_mut_ptr().add(off), byte, len) }
    }

    /// The mapping as a byte slice, for regions nobody can write.
    ///
    /// # Safety
    /// The caller guarantees no process can write the mapped range for the
    /// lifetime of the returned slice: the segment is sealed with
    /// `F_SEAL_WRITE` (checked by the caller) and this mapping is read-only.
    pub(crate) unsafe fn sealed_bytes(&self) -> &[u8] {
        // SAFETY: in bounds by construction; immutability is the caller's
        // contract (F_SEAL_WRITE forbids every writable mapping and write()).
        unsafe { std::slice::from_raw_parts(self.map.as_ptr(), self.len()) }
    }
}
