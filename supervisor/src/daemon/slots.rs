//! Connection slots shared by the control socket and the metrics
//! endpoint: a fixed number of connections, and when all are taken the one
//! idle the longest is told to close so that a new one can take its slot.
//! A connection busy with a request is never evicted.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

/// How long a connection accepted when every slot is taken waits for the
/// idle one it evicted to let go of its slot.
const EVICT_WAIT: Duration = Duration::from_secs(1);

/// The connection slots.
pub(super) struct Slots {
    permits: Arc<Semaphore>,
    table: Arc<Mutex<SlotTable>>,
}

#[derive(Default)]
struct SlotTable {
    next: u64,
    /// Per connection: idle since when (`None`: busy), and how to tell it
    /// to close.
    conns: HashMap<u64, (Option<Instant>, Arc<Notify>)>,
}

/// One connection's slot, given back when dropped. A new slot is idle.
pub(super) struct Slot {
    id: u64,
    table: Arc<Mutex<SlotTable>>,
    /// Notified when the connection is to close to make room.
    pub(super) evict: Arc<Notify>,
    _permit: OwnedSemaphorePermit,
}

fn lock(table: &Mutex<SlotTable>) -> std::sync::MutexGuard<'_, SlotTable> {
    table.lock().unwrap_or_else(|e| e.into_inner())
}

impl Slots {
    pub(super) fn new(n: usize) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(n)),
            table: Arc::default(),
        }
    }

    /// A slot for a new connection: a free one, or the one of the
    /// connection idle the longest, once it has closed. `None` if every
    /// connection is busy.
    async fn take(&self) -> Option<Slot> {
        let permit = match self.permits.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(_) => {
                let oldest = lock(&self.table)
                    .conns
                    .values()
                    .filter_map(|(idle, evict)| idle.map(|i| (i, evict.clone())))
                    .min_by_key(|(i, _)| *i)
                    .map(|(_, evict)| evict);
                oldest?.notify_one();
                tokio::time::timeout(EVICT_WAIT, self.permits.clone().acquire_owned())
                    .await
                    .ok()?
                    .ok()?
            }
        };
        let evict = Arc::new(Notify::new());
        let mut t = lock(&self.table);
        let id = t.next;
        t.next += 1;
        t.conns.insert(id, (Some(Instant::now()), evict.clone()));
        Some(Slot {
            id,
            table: self.table.clone(),
            evict,
            _permit: permit,
        })
    }

    /// The next connection `accept` gives, with its slot. An accept that
    /// fails is logged with `failed` and tried again 50 ms later; a
    /// connection for which no slot is found is closed, logged with `full`.
    pub(super) async fn accept<S, A, F>(
        &self,
        mut accept: impl FnMut() -> F,
        failed: &str,
        full: &str,
    ) -> (S, Slot)
    where
        F: Future<Output = std::io::Result<(S, A)>>,
    {
        loop {
            let stream = match accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "{failed}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            match self.take().await {
                Some(slot) => return (stream, slot),
                None => tracing::warn!("{full}"),
            }
        }
    }
}

impl Slot {
    /// Marks the connection idle (waiting for bytes, evictable) or busy.
    pub(super) fn set_idle(&self, idle: bool) {
        if let Some(e) = lock(&self.table).conns.get_mut(&self.id) {
            e.0 = idle.then(Instant::now);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.table).conns.remove(&self.id);
    }
}
