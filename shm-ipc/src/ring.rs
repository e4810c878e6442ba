//! The single-producer single-consumer ring protocol, independent of where
//! its words live (real shared memory, or loom's model of it).
//!
//! Each side keeps its own index privately and only *publishes* it; it never
//! reads its own index back from shared memory, so a peer scribbling over it
//! changes nothing for us. The index read from the peer is read once per
//! refresh and checked: `head - tail` (wrapping) must lie in `0..=slots`,
//! otherwise the peer is corrupt.
//!
//! Ordering pairs:
//! - producer `head.store(Release)` in [`Producer::publish`] ↔ consumer
//!   `head.load(Acquire)` in [`Consumer::peek`]: the slot's contents are
//!   visible before the consumer reads them.
//! - consumer `tail.store(Release)` in [`Consumer::release`] ↔ producer
//!   `tail.load(Acquire)` in [`Producer::reserve`]: the consumer finished
//!   reading a slot before the producer overwrites it.
//! - parking is Dekker-style: the waiter stores its `parked` flag, then a
//!   SeqCst fence, then re-checks the index; the other side stores the
//!   index, then a SeqCst fence, then reads `parked`. At least one of them
//!   sees the other's store, so a wake-up is never lost.

use crate::sync::{fence, AtomicU32, Ordering};

/// Where one ring's control words live.
pub(crate) trait RingWords {
    /// Producer's published count of sent messages.
    fn head(&self) -> &AtomicU32;
    /// Consumer's published count of released messages.
    fn tail(&self) -> &AtomicU32;
    /// Non-zero while the consumer is parked waiting for a message.
    fn consumer_parked(&self) -> &AtomicU32;
    /// Non-zero while the producer is parked waiting for a free slot.
    fn producer_parked(&self) -> &AtomicU32;
}

/// The peer published an index that no correct peer could.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt;

/// Producer side state of one ring.
#[derive(Debug)]
pub(crate) struct Producer {
    head: u32,
    cached_tail: u32,
    slots: u32,
}

impl Producer {
    pub(crate) fn new(slots: u32) -> Self {
        debug_assert!(slots.is_power_of_two());
        Self {
            head: 0,
            cached_tail: 0,
            slots,
        }
    }

    /// The slot the next message goes into, or `None` while the ring is full.
    pub(crate) fn reserve(&mut self, w: &impl RingWords) -> Result<Option<u32>, Corrupt> {
        if self.head.wrapping_sub(self.cached_tail) >= self.slots {
            // Acquire: pairs with the consumer's Release in `release`.
            let tail = w.tail().load(Ordering::Acquire);
            let used = self.head.wrapping_sub(tail);
            if used > self.slots {
                return Err(Corrupt);
            }
            self.cached_tail = tail;
            if used == self.slots {
                return Ok(None);
            }
        }
        Ok(Some(self.head & (self.slots - 1)))
    }

    /// Publishes the reserved slot. Returns whether the consumer is parked
    /// and must be woken.
    pub(crate) fn publish(&mut self, w: &impl RingWords) -> bool {
        self.head = self.head.wrapping_add(1);
        // Release: pairs with the consumer's Acquire in `peek`.
        w.head().store(self.head, Ordering::Release);
        // SeqCst fence: Dekker pairing with the consumer's `prepare_park`.
        fence(Ordering::SeqCst);
        w.consumer_parked().load(Ordering::Relaxed) != 0
    }

    /// Announces that the producer is about to park because the ring is
    /// full, then re-checks. `Some(slot)` means a slot freed up meanwhile
    /// (the flag is already cleared): do not park.
    pub(crate) fn prepare_park(&mut self, w: &impl RingWords) -> Result<Option<u32>, Corrupt> {
        w.producer_parked().store(1, Ordering::Relaxed);
        // SeqCst fence: Dekker pairing with the consumer's `release`.
        fence(Ordering::SeqCst);
        let slot = self.reserve(w);
        if !matches!(slot, Ok(None)) {
            w.producer_parked().store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Clears the parked flag after a wake-up.
    pub(crate) fn unpark(&self, w: &impl RingWords) {
        w.producer_parked().store(0, Ordering::Relaxed);
    }
}

/// Consumer side state of one ring.
#[derive(Debug)]
pub(crate) struct Consumer {
    tail: u32,
    cached_head: u32,
    slots: u32,
}

impl Consumer {
    pub(crate) fn new(slots: u32) -> Self {
        debug_assert!(slots.is_power_of_two());
        Self {
            tail: 0,
            cached_head: 0,
            slots,
        }
    }

    /// The slot holding the next message, or `None` while the ring is empty.
    pub(crate) fn peek(&mut self, w: &impl RingWords) -> Result<Option<u32>, Corrupt> {
        if self.cached_head == self.tail {
            // Acquire: pairs with the producer's Release in `publish`.
            let head = w.head().load(Ordering::Acquire);
            let avail = head.wrapping_sub(self.tail);
            if avail > self.slots {
                return Err(Corrupt);
            }
            self.cached_head = head;
            if avail == 0 {
                return Ok(None);
            }
        }
        Ok(Some(self.tail & (self.slots - 1)))
    }

    /// Releases the slot returned by `peek`. Returns whether the producer is
    /// parked and must be woken.
    pub(crate) fn release(&mut self, w: &impl RingWords) -> bool {
        self.tail = self.tail.wrapping_add(1);
        // Release: pairs with the producer's Acquire in `reserve`.
        w.tail().store(self.tail, Ordering::Release);
        // SeqCst fence: Dekker pairing with the producer's `prepare_park`.
        fence(Ordering::SeqCst);
        w.producer_parked().load(Ordering::Relaxed) != 0
    }

    /// Announces that the consumer is about to park, then re-checks.
    /// `Some(slot)` means a message arrived meanwhile (the flag is already
    /// cleared): do not park.
    pub(crate) fn prepare_park(&mut self, w: &impl RingWords) -> Result<Option<u32>, Corrupt> {
        w.consumer_parked().store(1, Ordering::Relaxed);
        // SeqCst fence: Dekker pairing with the producer's `publish`.
        fence(Ordering::SeqCst);
        let slot = self.peek(w);
        if !matches!(slot, Ok(None)) {
            w.consumer_parked().store(0, Ordering::Relaxed);
        }
        slot
    }

    /// Clears the parked flag after a wake-up.
    pub(crate) fn unpark(&self, w: &impl RingWords) {
        w.consumer_parked().store(0, Ordering::Relaxed);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Words([AtomicU32; 4]);
    impl RingWords for Words {
        fn head(&self) -> &AtomicU32 {
            &self.0[0]
        }
        fn tail(&self) -> &AtomicU32 {
            &self.0[1]
        }
        fn consumer_parked(&self) -> &AtomicU32 {
            &self.0[2]
        }
        fn producer_parked(&self) -> &AtomicU32 {
            &self.0[3]
        }
    }

    #[test]
    fn fills_and_drains_across_wraparound() {
        let w = Words::default();
        w.0[0].store(u32::MAX - 3, Ordering::Relaxed);
        w.0[1].store(u32::MAX - 3, Ordering::Relaxed);
        let mut p = Producer {
            head: u32::MAX - 3,
            cached_tail: u32::MAX - 3,
            slots: 4,
        };
        let mut c = Consumer {
            tail: u32::MAX - 3,
            cached_head: u32::MAX - 3,
            slots: 4,
        };
        for round in 0..5 {
            for _ in 0..4 {
                assert!(p.reserve(&w).unwrap().is_some(), "round {round}");
                p.publish(&w);
            }
            assert_eq!(p.reserve(&w), Ok(None));
            for _ in 0..4 {
                assert!(c.peek(&w).unwrap().is_some());
                c.release(&w);
            }
            assert_eq!(c.peek(&w), Ok(None));
        }
    }

    #[test]
    fn impossible_indices_are_corrupt() {
        let w = Words::default();
        let mut c = Consumer::new(4);
        w.0[0].store(5, Ordering::Relaxed);
        assert_eq!(c.peek(&w), Err(Corrupt));
        let mut p = Producer::new(4);
        for _ in 0..4 {
            p.reserve(&w).unwrap();
            p.publish(&w);
        }
        w.0[1].store(100, Ordering::Relaxed);
        assert_eq!(p.reserve(&w), Err(Corrupt));
    }

    #[test]
    fn parked_flags_ask_for_wakeups() {
        let w = Words::default();
        let mut p = Producer::new(2);
        let mut c = Consumer::new(2);
        assert_eq!(c.prepare_park(&w), Ok(None));
        p.reserve(&w).unwrap();
        assert!(p.publish(&w), "producer must see the parked consumer");
        c.unpark(&w);
        assert_eq!(c.peek(&w), Ok(Some(0)));
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Model-checks the ring: every interleaving of a producer and a
    //! consumer, with parking, delivers every message in order exactly once
    //! (a lost wake-up shows up as a loom deadlock, a slot read before it was
    //! written as a loom causality violation).
    use super::*;
    use loom::cell::UnsafeCell;
    use loom::sync::{Arc, Condvar, Mutex};

    const SLOTS: u32 = 2;
    const MESSAGES: u64 = 3;

    struct Shared {
        words: [AtomicU32; 4],
        slots: [UnsafeCell<u64>; SLOTS as usize],
        /// Doorbells: tokens rung for the consumer and for the producer.
        bell_consumer: (Mutex<u32>, Condvar),
        bell_producer: (Mutex<u32>, Condvar),
    }
    impl RingWords for Shared {
        fn head(&self) -> &AtomicU32 {
            &self.words[0]
        }
        fn tail(&self) -> &AtomicU32 {
            &self.words[1]
        }
        fn consumer_parked(&self) -> &AtomicU32 {
            &self.words[2]
        }
        fn producer_parked(&self) -> &AtomicU32 {
            &self.words[3]
        }
    }

    fn ring(bell: &(Mutex<u32>, Condvar)) {
        *bell.0.lock().unwrap() += 1;
        bell.1.notify_one();
    }

    fn wait(bell: &(Mutex<u32>, Condvar)) {
        let mut tokens = bell.0.lock().unwrap();
        while *tokens == 0 {
            tokens = bell.1.wait(tokens).unwrap();
        }
        *tokens = 0;
    }

    #[test]
    fn spsc_with_parking_never_loses_a_message_or_a_wakeup() {
        let mut builder = loom::model::Builder::new();
        // Bounded preemptions keep the search tractable (as tokio does);
        // LOOM_MAX_PREEMPTIONS overrides it for a deeper run.
        if builder.preemption_bound.is_none() {
            builder.preemption_bound = Some(3);
        }
        builder.check(|| {
            let s = Arc::new(Shared {
                words: Default::default(),
                slots: Default::default(),
                bell_consumer: (Mutex::new(0), Condvar::new()),
                bell_producer: (Mutex::new(0), Condvar::new()),
            });
            let sp = s.clone();
            let producer = loom::thread::spawn(move || {
                let mut p = Producer::new(SLOTS);
                for m in 1..=MESSAGES {
                    let slot = loop {
                        if let Some(slot) = p.reserve(&*sp).unwrap() {
                            break slot;
                        }
                        match p.prepare_park(&*sp).unwrap() {
                            Some(slot) => break slot,
                            None => {
                                wait(&sp.bell_producer);
                                p.unpark(&*sp);
                            }
                        }
                    };
                    sp.slots[slot as usize].with_mut(|v| {
                        // SAFETY: the slot is reserved: the consumer released
                        // it (Acquire on tail) and will not read it before the
                        // head Release below.
                        unsafe { *v = m }
                    });
                    if p.publish(&*sp) {
                        ring(&sp.bell_consumer);
                    }
                }
            });
            let mut c = Consumer::new(SLOTS);
            for expect in 1..=MESSAGES {
                let slot = loop {
                    if let Some(slot) = c.peek(&*s).unwrap() {
                        break slot;
                    }
                    match c.prepare_park(&*s).unwrap() {
                        Some(slot) => break slot,
                        None => {
                            wait(&s.bell_consumer);
                            c.unpark(&*s);
                        }
                    }
                };
                // SAFETY: the slot was published (Acquire on head) and the
                // producer will not rewrite it before our tail Release.
                let got = s.slots[slot as usize].with(|v| unsafe { *v });
                assert_eq!(got, expect);
                if c.release(&*s) {
                    ring(&s.bell_producer);
                }
            }
            producer.join().unwrap();
        });
    }
}
