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
        unsafe { copy::from_shared(self.map.as_ptr().add(off), dst.as_mut_ptr(), dst.len()) }
    }

    /// Folds `len` bytes at `off` as little-endian `u64` words, each read
    /// straight out of the mapping into a register (the last partial word
    /// zero-padded). No reference to shared memory is created: every word
    /// is a private copy, so a peer writing meanwhile only changes which
    /// values are seen.
    #[inline]
    pub(crate) fn fold_words<A>(
        &self,
        off: usize,
        len: usize,
        init: A,
        mut f: impl FnMut(A, u64) -> A,
    ) -> A {
        self.check(off, len, 1);
        let words = len / 8;
        // SAFETY: off..off + len is inside the mapping (checked above).
        let base = unsafe { self.map.as_ptr().add(off) };
        let mut acc = init;
        for i in 0..words {
            // SAFETY: 8 * i + 8 <= len, inside the checked range; an
            // unaligned read of a u64 accepts any address and bit pattern.
            let w = unsafe { std::ptr::read_unaligned(base.add(8 * i) as *const u64) };
            acc = f(acc, u64::from_le(w));
        }
        if words * 8 < len {
            let mut tail = [0u8; 8];
            self.copy_out(off + words * 8, &mut tail[..len - words * 8]);
            acc = f(acc, u64::from_le_bytes(tail));
        }
        acc
    }

    /// Hints the CPU to fetch the cache lines of `len` bytes at `off`. A
    /// hint only: nothing is read into the program, so it is harmless
    /// whatever the peer writes there.
    #[inline]
    pub(crate) fn prefetch(&self, off: usize, len: usize) {
        self.check(off, len, 1);
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let mut line = 0;
            while line < len {
                // SAFETY: `off + line` is inside the mapping (checked above);
                // a prefetch never faults and reads nothing into the program.
                unsafe {
                    _mm_prefetch::<_MM_HINT_T0>(self.map.as_ptr().add(off + line).cast());
                }
                line += 64;
            }
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

/// Copies out of memory another core has just written.
///
/// Measured on this project's 2-vCPU AMD EPYC machine, reading 1 MiB that
/// the peer process had just written: glibc's `memcpy` (in 4 KiB chunks)
/// took 80-120 µs, a plain loop of 16-byte SSE2 loads and stores 50 µs. The
/// loads of the plain loop are independent and in address order, so the
/// core keeps many cache-line fetches from the other core in flight; the
/// string-instruction path `memcpy` picks for these sizes does not. Small
/// copies stay with `memcpy`.
mod copy {
    /// Copies from this size on use the load/store loop.
    #[cfg(target_arch = "x86_64")]
    const LOOP_MIN: usize = 256;

    /// Copies `len` bytes from `src` (shared memory) to `dst` (private).
    ///
    /// # Safety
    /// `src..src + len` is valid for reads, `dst..dst + len` for writes, the
    /// two do not overlap, and no reference to the source range exists.
    pub(super) unsafe fn from_shared(src: *const u8, dst: *mut u8, len: usize) {
        #[cfg(target_arch = "x86_64")]
        if len >= LOOP_MIN {
            // SAFETY: forwarded contract.
            unsafe { x86::copy(src, dst, len) };
            return;
        }
        // SAFETY: forwarded contract.
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) }
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_storeu_si128};

        /// # Safety
        /// As [`super::from_shared`].
        pub(super) unsafe fn copy(src: *const u8, dst: *mut u8, len: usize) {
            let body = len / 64 * 64;
            let mut i = 0;
            while i < body {
                // SAFETY: i + 64 <= len, so both 64-byte ranges lie inside
                // the caller's ranges; unaligned loads and stores need no
                // alignment; SSE2 is part of the x86_64 baseline.
                unsafe {
                    let (s, d) = (src.add(i) as *const __m128i, dst.add(i) as *mut __m128i);
                    let a = _mm_loadu_si128(s);
                    let b = _mm_loadu_si128(s.add(1));
                    let c = _mm_loadu_si128(s.add(2));
                    let e = _mm_loadu_si128(s.add(3));
                    _mm_storeu_si128(d, a);
                    _mm_storeu_si128(d.add(1), b);
                    _mm_storeu_si128(d.add(2), c);
                    _mm_storeu_si128(d.add(3), e);
                }
                i += 64;
            }
            // SAFETY: the remaining len - body bytes of the caller's ranges.
            unsafe { std::ptr::copy_nonoverlapping(src.add(body), dst.add(body), len - body) }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Region;
    use crate::segment::create_memfd;

    #[test]
    fn folds_words_in_place_with_a_padded_tail() {
        let len = 4096;
        let fd = create_memfd(c"fold-test", len as u64).expect("segment");
        let region = Region::map_rw(&fd, len).expect("map");
        let pattern: Vec<u8> = (0..len).map(|i| (i * 13 + 5) as u8).collect();
        region.copy_in(0, &pattern);
        for n in [0, 1, 7, 8, 9, 63, 64, 1000, 4000] {
            for off in [0, 3, 8, 61] {
                let words: Vec<u64> = region.fold_words(off, n, Vec::new(), |mut v, w| {
                    v.push(w);
                    v
                });
                let mut expected = Vec::new();
                for chunk in pattern[off..off + n].chunks(8) {
                    let mut w = [0u8; 8];
                    w[..chunk.len()].copy_from_slice(chunk);
                    expected.push(u64::from_le_bytes(w));
                }
                assert_eq!(words, expected, "len {n} off {off}");
            }
        }
    }

    #[test]
    fn copies_out_every_length_and_offset_exactly() {
        let len = 8192;
        let fd = create_memfd(c"copy-test", len as u64).expect("segment");
        let region = Region::map_rw(&fd, len).expect("map");
        let pattern: Vec<u8> = (0..len).map(|i| (i * 7 + i / 251) as u8).collect();
        region.copy_in(0, &pattern);
        // Around the loop threshold and the 64-byte step, at odd offsets.
        for n in [0, 1, 63, 64, 65, 255, 256, 257, 319, 320, 1000, 4096, 8000] {
            for off in [0, 1, 17, 64, 191] {
                if off + n > len {
                    continue;
                }
                let mut out = vec![0u8; n];
                region.copy_out(off, &mut out);
                assert_eq!(out, pattern[off..off + n], "len {n} off {off}");
            }
        }
    }
}
