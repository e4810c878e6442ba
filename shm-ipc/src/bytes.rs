//! Views of message bytes that live in shared memory.

use crate::region::Region;

/// Size of the private buffer [`ShmSlice::for_each_chunk`] copies through.
const CHUNK: usize = 4096;

/// A read view of `len` bytes in a shared segment that the peer can still
/// write.
///
/// It never hands out a reference into shared memory: bytes are copied into
/// private memory first ([`copy_to`](Self::copy_to), [`to_vec`](Self::to_vec),
/// [`for_each_chunk`](Self::for_each_chunk)). The length was read once from
/// the slot header and bounds-checked before this view was made.
#[derive(Debug, Clone, Copy)]
pub struct ShmSlice<'a> {
    region: &'a Region,
    off: usize,
    len: usize,
}

impl<'a> ShmSlice<'a> {
    pub(crate) fn new(region: &'a Region, off: usize, len: usize) -> Self {
        assert!(off.checked_add(len).is_some_and(|end| end <= region.len()));
        Self { region, off, len }
    }

    /// Number of bytes in the message.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the message is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Copies the first `dst.len()` bytes into `dst`.
    ///
    /// # Panics
    /// If `dst` is longer than the message.
    pub fn copy_to(&self, dst: &mut [u8]) {
        assert!(
            dst.len() <= self.len,
            "copy_to: destination longer than message"
        );
        self.region.copy_out(self.off, dst);
    }

    /// Copies the message into a new vector.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = vec![0; self.len];
        self.region.copy_out(self.off, &mut v);
        v
    }

    /// Visits the message in order, a private copy of at most 4 KiB at a
    /// time: reads every byte in place without allocating.
    pub fn for_each_chunk(&self, mut f: impl FnMut(&[u8])) {
        let mut buf = [0u8; CHUNK];
        let mut done = 0;
        while done < self.len {
            let n = CHUNK.min(self.len - done);
            self.region.copy_out(self.off + done, &mut buf[..n]);
            f(&buf[..n]);
            done += n;
        }
    }

    /// Folds the message as little-endian `u64` words read in place, with
    /// no copy to any buffer (the last partial word is zero-padded): the
    /// fastest way to checksum or scan a large message. Each word is a
    /// private copy; a peer writing meanwhile only changes the values seen.
    #[inline]
    pub fn fold_words<A>(&self, init: A, f: impl FnMut(A, u64) -> A) -> A {
        self.region.fold_words(self.off, self.len, init, f)
    }

    /// A sub-range of this view.
    ///
    /// # Panics
    /// If the range is out of bounds.
    pub fn slice(&self, start: usize, len: usize) -> ShmSlice<'a> {
        assert!(
            start.checked_add(len).is_some_and(|end| end <= self.len),
            "slice out of bounds"
        );
        ShmSlice::new(self.region, self.off + start, len)
    }
}

/// A loaned slot: write a message in place, then hand it back to the channel
/// to send. Writes past the slot's capacity fail without writing.
#[derive(Debug)]
pub struct SlotWriter<'a> {
    region: &'a Region,
    off: usize,
    capacity: usize,
    len: usize,
}

/// A write did not fit in the loaned slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("message of {needed} bytes exceeds slot capacity {capacity}")]
pub struct SlotFull {
    /// Bytes the message would have needed.
    pub needed: usize,
    /// Capacity of the slot.
    pub capacity: usize,
}

impl<'a> SlotWriter<'a> {
    pub(crate) fn new(region: &'a Region, off: usize, capacity: usize) -> Self {
        assert!(off
            .checked_add(capacity)
            .is_some_and(|end| end <= region.len()));
        Self {
            region,
            off,
            capacity,
            len: 0,
        }
    }

    /// Bytes the slot can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes written so far (the message length).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends `bytes` to the message.
    pub fn write(&mut self, bytes: &[u8]) -> Result<(), SlotFull> {
        let needed = self.len + bytes.len();
        if needed > self.capacity {
            return Err(SlotFull {
                needed,
                capacity: self.capacity,
            });
        }
        self.region.copy_in(self.off + self.len, bytes);
        self.len = needed;
        Ok(())
    }

    /// Writes `bytes` at `pos`, growing the message to cover it.
    pub fn write_at(&mut self, pos: usize, bytes: &[u8]) -> Result<(), SlotFull> {
        let end = pos.saturating_add(bytes.len());
        if end > self.capacity {
            return Err(SlotFull {
                needed: end,
                capacity: self.capacity,
            });
        }
        self.region.copy_in(self.off + pos, bytes);
        self.len = self.len.max(end);
        Ok(())
    }

    /// Appends `len` copies of `byte`.
    pub fn fill(&mut self, byte: u8, len: usize) -> Result<(), SlotFull> {
        let needed = self.len + len;
        if needed > self.capacity {
            return Err(SlotFull {
                needed,
                capacity: self.capacity,
            });
        }
        self.region.fill(self.off + self.len, len, byte);
        self.len = needed;
        Ok(())
    }

    /// Forgets what was written.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}
