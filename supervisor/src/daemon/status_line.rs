//! The one-line summary emberd keeps in systemd's `STATUS=` (what
//! `systemctl status emberd` shows under the unit's name): modules by state
//! and the warm pool, e.g. `2 modules running, 1 failed; pool 4/4 idle`.
//!
//! After each burst of events the daemon asks the state owner for its
//! counts (a walk over the modules, no I/O) and the pool for its idle count,
//! and sends the line only when it differs from the last one sent.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};

use super::events::Record;

use super::actor::{Actor, ActorMsg};
use crate::lifecycle::State;
use crate::notify::Notifier;
use crate::pool::{PoolHandle, PoolStats};

/// A burst of events is summed up once, this long after its first event.
pub const SETTLE: Duration = Duration::from_millis(100);

/// Modules by the state of the replicas that serve them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Ready.
    pub running: usize,
    /// Being installed, launched, or waiting for a service.
    pub starting: usize,
    /// Crashed (back-off, crash loop) or given up.
    pub failed: usize,
    /// Stopped or stopping.
    pub stopped: usize,
}

impl Counts {
    fn add(&mut self, state: State) {
        match state {
            State::Running => self.running += 1,
            State::Installing | State::Waiting | State::Starting => self.starting += 1,
            State::BackOff | State::CrashLoop | State::Failed => self.failed += 1,
            State::Stopping | State::Stopped => self.stopped += 1,
        }
    }
}

impl Actor {
    /// The counts of the summary line (answered at once: no I/O).
    pub(super) fn status_counts(&self) -> Counts {
        let mut c = Counts::default();
        for m in self.modules.values() {
            c.add(m.state());
        }
        c
    }
}

/// `3 modules running, 1 starting, 1 failed; pool 2/4 idle`: the running
/// count always, the others when not zero; the pool's idle workers out of
/// its `max_idle` (`pool down` when its task is gone).
pub fn line(c: Counts, pool: Option<&PoolStats>) -> String {
    let noun = if c.running == 1 { "module" } else { "modules" };
    let mut s = format!("{} {noun} running", c.running);
    for (n, what) in [
        (c.starting, "starting"),
        (c.failed, "failed"),
        (c.stopped, "stopped"),
    ] {
        if n > 0 {
            s.push_str(&format!(", {n} {what}"));
        }
    }
    match pool {
        Some(p) => s.push_str(&format!("; pool {}/{} idle", p.idle, p.max_idle)),
        None => s.push_str("; pool down"),
    }
    s
}

/// Sends `STATUS=` each time the summary changes, until aborted: rebuilt
/// after each burst of events (state changes, installs, pool refills and
/// misses), never on a timer, so an idle emberd is not woken for it.
pub async fn keep_current(
    n: Arc<Notifier>,
    actor: mpsc::Sender<ActorMsg>,
    pool: PoolHandle,
    mut events: broadcast::Receiver<Arc<Record>>,
) {
    let mut last = String::new();
    loop {
        let (tx, rx) = oneshot::channel();
        if actor.send(ActorMsg::StatusCounts(tx)).await.is_err() {
            return;
        }
        let Ok(counts) = rx.await else { return };
        let stats = pool.stats().await.ok();
        let now = line(counts, stats.as_ref());
        if now != last {
            if let Err(e) = n.notify(&format!("STATUS={now}")) {
                tracing::debug!(error = %crate::error_chain(&e), "cannot send STATUS");
            }
            last = now;
        }
        // The next change (a lagged receiver has missed some: rebuild all
        // the same), then whatever follows it within the settle time.
        if let Err(broadcast::error::RecvError::Closed) = events.recv().await {
            return;
        }
        let settle = tokio::time::sleep(SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                r = events.recv() => if let Err(broadcast::error::RecvError::Closed) = r {
                    return;
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_line_names_what_is_not_zero() {
        let pool = PoolStats {
            idle: 3,
            max_idle: 4,
            ..PoolStats::default()
        };
        assert_eq!(
            line(Counts::default(), Some(&pool)),
            "0 modules running; pool 3/4 idle"
        );
        let mut c = Counts::default();
        c.add(State::Running);
        assert_eq!(line(c, Some(&pool)), "1 module running; pool 3/4 idle");
        for s in [
            State::Running,
            State::CrashLoop,
            State::Failed,
            State::Starting,
            State::Stopped,
        ] {
            c.add(s);
        }
        assert_eq!(
            line(c, None),
            "2 modules running, 1 starting, 2 failed, 1 stopped; pool down"
        );
    }
}
