//! Malloc settings a zygote makes before it forks, so that each worker's
//! heap stays small, and a supervisor makes so that large buffers cost no
//! memset.
//!
//! Workers share the zygote's heap copy-on-write: every heap page a worker
//! writes becomes its own. glibc raises its mmap threshold dynamically:
//! once a large block (a 1 MiB receive buffer) served by `mmap` is freed,
//! blocks that size come from the heap instead, where `calloc` clears them
//! and the freed memory stays (the trim threshold rises with it) — 1 MiB of
//! private heap in every worker, and in the supervisor a 1 MiB `memset`
//! for each such buffer. A fixed threshold keeps large blocks in their own
//! mappings: `calloc` gets zeroed pages from the kernel without touching
//! them, and `free` gives them back.

/// glibc's default mmap threshold, made fixed (setting it disables the
/// dynamic adjustment).
const MMAP_THRESHOLD: i32 = 128 * 1024;

/// Fixes malloc's mmap threshold for this process and the workers it
/// forks. Call in the zygote before it forks, and early in a supervisor.
pub fn keep_worker_heaps_small() {
    // SAFETY: mallopt only sets a malloc parameter; it takes malloc's own
    // lock and is safe to call at any time.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
    }
}
