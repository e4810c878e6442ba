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
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Instant;

use memmap2::{MmapOptions, MmapRaw};

/// A shared mapping of a whole segment (read-write or read-only).
#[derive(Debug)]
pub(crate) struct Region {
    map: MmapRaw,
    /// How this mapping's large writes went (see [`BulkWrites`]).
    bulk: BulkWrites,
}

/// Writes of at least this many bytes choose between cached and streaming
/// stores.
const BULK_MIN: usize = 256 << 10;
/// One large write in this many tries the method that looks worse, so a
/// change in where the host runs the two processes is noticed.
const BULK_PROBE: u64 = 16;

/// The choice between cached and streaming (non-temporal) stores for large
/// writes, made from how long each took lately on this mapping.
///
/// Measured on this project's 2-vCPU AMD EPYC guests, writing 1 MiB that
/// the peer then reads, where the host runs the two vCPUs decides which is
/// cheaper, and that changes over seconds: with both on cores that share a
/// cache, cached stores took 27 µs and the peer read the data in 17 µs;
/// with the vCPUs on different dies, cached stores took 161 µs (each line
/// the peer had read must be taken back across the dies) and the read 79
/// µs, where streaming stores took 45 µs and the peer read from memory in
/// 53 µs, wherever it ran. The writer's own time ranks the two methods the
/// same way the whole transfer does, so it is what is measured.
#[derive(Debug, Default)]
struct BulkWrites {
    /// Moving averages of picoseconds per byte; 0 until measured.
    cached_ps: AtomicU64,
    streaming_ps: AtomicU64,
    writes: AtomicU64,
}

impl BulkWrites {
    /// Whether the next large write should stream.
    fn stream_next(&self) -> bool {
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        let cached = self.cached_ps.load(Ordering::Relaxed);
        let streaming = self.streaming_ps.load(Ordering::Relaxed);
        if cached == 0 || streaming == 0 {
            // Measure each once: cached first.
            return cached != 0;
        }
        (streaming < cached) != (n % BULK_PROBE == BULK_PROBE - 1)
    }

    /// Records how long a large write of `len` bytes took.
    fn record(&self, streamed: bool, took: std::time::Duration, len: usize) {
        let ps = (took.as_nanos().saturating_mul(1000) / len.max(1) as u128)
            .clamp(1, u64::MAX as u128) as u64;
        let avg = if streamed {
            &self.streaming_ps
        } else {
            &self.cached_ps
        };
        let old = avg.load(Ordering::Relaxed);
        // A quarter weight: a few writes follow a change of placement.
        let new = if old == 0 { ps } else { old - old / 4 + ps / 4 };
        avg.store(new.max(1), Ordering::Relaxed);
    }
}

impl Region {
    /// Maps `len` bytes of `fd` shared and read-write, pre-faulting every page.
    pub(crate) fn map_rw(fd: impl AsFd, len: usize) -> std::io::Result<Self> {
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw(&fd.as_fd())?;
        Ok(Self {
            map,
            bulk: BulkWrites::default(),
        })
    }

    /// Maps `len` bytes of `fd` shared and read-only.
    pub(crate) fn map_ro(fd: impl AsFd, len: usize) -> std::io::Result<Self> {
        let map = MmapOptions::new()
            .len(len)
            .populate()
            .map_raw_read_only(&fd.as_fd())?;
        Ok(Self {
            map,
            bulk: BulkWrites::default(),
        })
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

    /// Copies `src` into the mapping at `off`. Large copies use cached or
    /// streaming stores, whichever was cheaper lately ([`BulkWrites`]);
    /// either way every byte is in place before a later Release store (the
    /// streaming path ends with a store fence).
    pub(crate) fn copy_in(&self, off: usize, src: &[u8]) {
        self.check(off, src.len(), 1);
        // SAFETY: the destination range is inside a writable mapping (only
        // writable regions are ever written: callers hold a `map_rw` region)
        // and cannot alias the private `src`. No reference to shared memory
        // is created.
        let dst = unsafe { self.map.as_mut_ptr().add(off) };
        if src.len() < BULK_MIN {
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
            return;
        }
        self.bulk_write(src.len(), |stream| {
            // SAFETY: as above; `copy::streaming` has the same contract.
            unsafe {
                if stream {
                    copy::streaming(src.as_ptr(), dst, src.len())
                } else {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len())
                }
            }
        });
    }

    /// Fills `len` bytes at `off` with `byte` (large fills as in
    /// [`copy_in`](Self::copy_in)).
    pub(crate) fn fill(&self, off: usize, len: usize, byte: u8) {
        self.check(off, len, 1);
        // SAFETY: in-bounds range of a writable mapping, no reference created.
        let dst = unsafe { self.map.as_mut_ptr().add(off) };
        if len < BULK_MIN {
            // SAFETY: as above.
            unsafe { std::ptr::write_bytes(dst, byte, len) };
            return;
        }
        self.bulk_write(len, |stream| {
            // SAFETY: as above; `copy::streaming_fill` has the same contract.
            unsafe {
                if stream {
                    copy::streaming_fill(dst, byte, len)
                } else {
                    std::ptr::write_bytes(dst, byte, len)
                }
            }
        });
    }

    /// Runs a large write with the method [`BulkWrites`] picks, and times it.
    fn bulk_write(&self, len: usize, write: impl FnOnce(bool)) {
        let stream = copy::CAN_STREAM && self.bulk.stream_next();
        let start = Instant::now();
        write(stream);
        self.bulk.record(stream, start.elapsed(), len);
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

    /// Whether streaming stores exist here (else `streaming*` are plain
    /// stores and never chosen).
    pub(super) const CAN_STREAM: bool = cfg!(target_arch = "x86_64");

    /// Copies `len` bytes from `src` (private) to `dst` (shared) with
    /// streaming stores, which bypass the caches, then a store fence.
    ///
    /// # Safety
    /// `src..src + len` is valid for reads, `dst..dst + len` for writes, the
    /// two do not overlap, and no reference to the destination exists.
    pub(super) unsafe fn streaming(src: *const u8, dst: *mut u8, len: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded contract.
        unsafe {
            x86::stream(
                dst,
                len,
                |i| std::arch::x86_64::_mm_loadu_si128(src.add(i).cast()),
                |d, n| std::ptr::copy_nonoverlapping(src.add(d), dst.add(d), n),
            )
        };
        #[cfg(not(target_arch = "x86_64"))]
        // SAFETY: forwarded contract.
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, len)
        };
    }

    /// Fills `len` bytes at `dst` (shared) with `byte` with streaming
    /// stores, then a store fence.
    ///
    /// # Safety
    /// `dst..dst + len` is valid for writes and no reference to it exists.
    pub(super) unsafe fn streaming_fill(dst: *mut u8, byte: u8, len: usize) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: forwarded contract.
        unsafe {
            let v = std::arch::x86_64::_mm_set1_epi8(byte as i8);
            x86::stream(
                dst,
                len,
                |_| v,
                |d, n| std::ptr::write_bytes(dst.add(d), byte, n),
            )
        };
        #[cfg(not(target_arch = "x86_64"))]
        // SAFETY: forwarded contract.
        unsafe {
            std::ptr::write_bytes(dst, byte, len)
        };
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

        /// Writes `len` bytes at `dst`: the unaligned head and tail with
        /// `plain(offset, n)`, every aligned 16-byte block at offset `i` in
        /// between as `block(i)` with a streaming store; then a store fence,
        /// so the streaming stores are ordered before any later store (the
        /// slot's publication).
        ///
        /// # Safety
        /// `dst..dst + len` is valid for writes with no reference to it;
        /// `block(i)` and `plain` may be called for any offsets inside it.
        pub(super) unsafe fn stream(
            dst: *mut u8,
            len: usize,
            block: impl Fn(usize) -> __m128i,
            plain: impl Fn(usize, usize),
        ) {
            use std::arch::x86_64::{_mm_sfence, _mm_stream_si128};
            let head = dst.align_offset(16).min(len);
            plain(0, head);
            let body = (len - head) / 64 * 64;
            let mut i = head;
            while i < head + body {
                // SAFETY: i + 64 <= len and dst + i is 16-aligned, so the four
                // aligned 16-byte stores lie inside the caller's range.
                unsafe {
                    let d = dst.add(i) as *mut __m128i;
                    _mm_stream_si128(d, block(i));
                    _mm_stream_si128(d.add(1), block(i + 16));
                    _mm_stream_si128(d.add(2), block(i + 32));
                    _mm_stream_si128(d.add(3), block(i + 48));
                }
                i += 64;
            }
            plain(i, len - i);
            // SAFETY: a fence has no preconditions (SSE is baseline on
            // x86_64).
            unsafe { _mm_sfence() };
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
    fn streaming_stores_write_every_length_and_offset_exactly() {
        let len = 8192;
        let fd = create_memfd(c"stream-test", len as u64).expect("segment");
        let region = Region::map_rw(&fd, len).expect("map");
        let pattern: Vec<u8> = (0..len).map(|i| (i * 5 + i / 97) as u8).collect();
        for n in [0, 1, 15, 16, 17, 63, 64, 65, 200, 4096, 8000] {
            for off in [0, 1, 15, 16, 48, 191] {
                if off + n > len {
                    continue;
                }
                region.fill(0, len, 0xee);
                // SAFETY: off..off + n is inside the writable mapping and
                // the private pattern; no reference to the mapping exists.
                unsafe {
                    super::copy::streaming(pattern.as_ptr(), region.map.as_mut_ptr().add(off), n)
                };
                let mut out = vec![0u8; len];
                region.copy_out(0, &mut out);
                assert_eq!(&out[off..off + n], &pattern[..n], "copy len {n} off {off}");
                assert!(
                    out[..off].iter().all(|&b| b == 0xee),
                    "before, len {n} off {off}"
                );
                assert!(
                    out[off + n..].iter().all(|&b| b == 0xee),
                    "after, len {n} off {off}"
                );

                // SAFETY: as above.
                unsafe { super::copy::streaming_fill(region.map.as_mut_ptr().add(off), 7, n) };
                region.copy_out(0, &mut out);
                assert!(
                    out[off..off + n].iter().all(|&b| b == 7),
                    "fill len {n} off {off}"
                );
                assert!(out[..off].iter().all(|&b| b == 0xee));
                assert!(out[off + n..].iter().all(|&b| b == 0xee));
            }
        }
    }

    #[test]
    fn large_writes_measure_both_methods_then_use_the_cheaper_and_probe_the_other() {
        let b = super::BulkWrites::default();
        let ms = std::time::Duration::from_millis;
        // Unmeasured: cached first, then streaming.
        assert!(!b.stream_next());
        b.record(false, ms(2), 1 << 20);
        assert!(b.stream_next());
        b.record(true, ms(1), 1 << 20);
        // Streaming is cheaper: used, except one write in BULK_PROBE.
        let picks: Vec<bool> = (0..2 * super::BULK_PROBE)
            .map(|_| b.stream_next())
            .collect();
        assert_eq!(picks.iter().filter(|s| !**s).count(), 2, "{picks:?}");
        // Cached becomes cheaper (the host moved the processes): a few
        // probes later it is used.
        for _ in 0..8 {
            b.record(false, std::time::Duration::from_micros(100), 1 << 20);
        }
        let picks: Vec<bool> = (0..2 * super::BULK_PROBE)
            .map(|_| b.stream_next())
            .collect();
        assert_eq!(picks.iter().filter(|s| **s).count(), 2, "{picks:?}");
    }

    #[test]
    fn large_copies_and_fills_land_whatever_the_method() {
        let len = 4 << 20;
        let fd = create_memfd(c"bulk-test", len as u64).expect("segment");
        let region = Region::map_rw(&fd, len).expect("map");
        let src: Vec<u8> = (0..super::BULK_MIN + 100)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut out = vec![0u8; src.len()];
        // Enough writes that both methods are used.
        for k in 0..2 * super::BULK_PROBE as usize {
            let off = 3 + k * 64;
            region.copy_in(off, &src);
            region.copy_out(off, &mut out);
            assert_eq!(out, src, "copy {k}");
            region.fill(off, src.len(), k as u8);
            region.copy_out(off, &mut out);
            assert!(out.iter().all(|&b| b == k as u8), "fill {k}");
        }
        let b = &region.bulk;
        assert!(b.cached_ps.load(std::sync::atomic::Ordering::Relaxed) > 0);
        assert!(b.streaming_ps.load(std::sync::atomic::Ordering::Relaxed) > 0);
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
