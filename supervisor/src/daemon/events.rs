//! The event hub: what happens in emberd (a replica changing state, an
//! install, a rollout step, a pool miss, a zygote restart) as typed
//! [`Event`]s, each numbered (a sequence monotonic per daemon) and
//! timestamped, fanned out to every `Events` subscriber.
//!
//! Emitters call [`EventHub::emit`] where the change happens (the lifecycle
//! transition point, the install and rollout pipelines, the pool task):
//! the cost is one non-blocking send per change, whoever listens. The
//! fan-out is a bounded [`broadcast`] ring of [`EventHub::capacity`]
//! events: a subscriber that falls further behind than that is not waited
//! for; its next receive reports how many events it missed, and the
//! control socket drops it with `io.ember.Supervisor.EventsLagged`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::sync::broadcast;

use crate::lifecycle::{State, Transition};

/// Events kept for subscribers when the configuration does not say.
pub const DEFAULT_CAPACITY: usize = 1024;

/// Something that happened, as `Events` sends it (`kind` names the
/// variant; its fields are flattened beside `seq` and `time`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Event {
    /// A replica changed state: a start, a crash (to `backoff`,
    /// `crashloop` or `failed`, with the reason), a restart (from
    /// `backoff`/`crashloop` to `starting`), a stop.
    State {
        /// Module name.
        module: String,
        /// The revision the replica runs.
        revision: u64,
        /// Replica number.
        replica: u32,
        /// The state it left.
        from: State,
        /// The state it entered.
        to: State,
        /// Why (crashes, failures, waits).
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
        /// The worker concerned (the one that exited, for a crash).
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
        /// The replica's restarts so far.
        restarts: u64,
    },
    /// A module was installed (its state is on disk).
    Installed {
        /// Module name.
        module: String,
        /// Its version.
        version: String,
        /// Its revision.
        revision: u64,
    },
    /// A module was uninstalled (stopped and forgotten).
    Uninstalled {
        /// Module name.
        module: String,
    },
    /// A rollout began, moved on, or ended.
    Rollout {
        /// Module name.
        module: String,
        /// The revision rolled out to.
        revision: u64,
        /// The revision it replaces.
        from_revision: u64,
        /// `started`, then the phase it enters (`progressing`, `paused`,
        /// `draining`, `stabilizing`, `rolling-back`), then its outcome
        /// (`completed`, `rolled-back`, `aborted`).
        step: String,
        /// Why it rolls back or was aborted.
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// The warm pool forked a worker for later (`refill`), or had none
    /// idle for a launch (`miss`: the launch waits for a fork).
    Pool {
        /// `refill` or `miss`.
        what: &'static str,
        /// The forked worker.
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
    },
    /// The zygote died (`died`) or a new one serves (`restarted`).
    Zygote {
        /// `died` or `restarted`.
        what: &'static str,
        /// The zygote's pid.
        #[serde(skip_serializing_if = "Option::is_none")]
        pid: Option<i32>,
    },
}

impl Event {
    /// The module it is about, if any (the `Events` name filter).
    pub fn module(&self) -> Option<&str> {
        match self {
            Event::State { module, .. }
            | Event::Installed { module, .. }
            | Event::Uninstalled { module }
            | Event::Rollout { module, .. } => Some(module),
            Event::Pool { .. } | Event::Zygote { .. } => None,
        }
    }
}

/// One event as subscribers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    /// Its number: one more than the previous event's of this daemon.
    pub seq: u64,
    /// This emberd: its pid and start time (`PID-UNIXMILLIS`). `seq`
    /// starts again at 1 when emberd restarts; a different `daemon` tells
    /// a reader that a restart, not a gap, is why it did.
    pub daemon: &'static str,
    /// When it was emitted, UTC with milliseconds
    /// (`2026-12-05T21:00:00.123Z`).
    pub time: String,
    /// What happened.
    #[serde(flatten)]
    pub event: Event,
}

/// This process's daemon instance id, `PID-UNIXMILLIS` (its start).
pub fn daemon_id() -> &'static str {
    static ID: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    ID.get_or_init(|| {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis();
        format!("{}-{ms}", std::process::id())
    })
}

/// An `Events` follower's start.
#[derive(Debug)]
pub struct Subscription {
    /// Every event from now on.
    pub rx: broadcast::Receiver<Arc<Record>>,
    /// How many events (of those it wants) it may fall behind by.
    pub capacity: usize,
    /// The last event's number before it subscribed.
    pub last_seq: u64,
    /// [`daemon_id`].
    pub daemon: &'static str,
}

/// The hub: cheap to clone, one per daemon.
#[derive(Debug, Clone)]
pub struct EventHub {
    /// The last sequence number given, held while sending so subscribers
    /// receive events in sequence order whichever task emits them.
    seq: Arc<Mutex<u64>>,
    tx: broadcast::Sender<Arc<Record>>,
    capacity: usize,
}

impl EventHub {
    /// A hub keeping up to `capacity` events for a subscriber that has not
    /// read them yet (at least 1).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        let (tx, _) = broadcast::channel(capacity);
        Self {
            seq: Arc::default(),
            tx,
            capacity,
        }
    }

    /// How far a subscriber may fall behind before it is dropped.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Publishes `event`: numbers it, stamps it, and hands it to every
    /// subscriber without waiting for any. With nobody subscribed it costs
    /// the number and the stamp.
    pub fn emit(&self, event: Event) {
        let mut seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        *seq += 1;
        let record = Record {
            seq: *seq,
            daemon: daemon_id(),
            time: timestamp(SystemTime::now()),
            event,
        };
        // No subscriber is not an error.
        let _ = self.tx.send(Arc::new(record));
    }

    /// The number of the last event emitted (0: none yet).
    pub fn last_seq(&self) -> u64 {
        *self.seq.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new subscriber: it receives every event emitted from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Record>> {
        self.tx.subscribe()
    }

    /// A new `Events` follower: its receiver, and the number of the last
    /// event before it (taken together: the first event it receives is
    /// `last_seq + 1`).
    pub fn follow(&self) -> Subscription {
        let seq = self.seq.lock().unwrap_or_else(|e| e.into_inner());
        Subscription {
            rx: self.tx.subscribe(),
            capacity: self.capacity,
            last_seq: *seq,
            daemon: daemon_id(),
        }
    }

    /// What a replica's [`crate::lifecycle::Lifecycle`] reports its
    /// transitions to: a [`Event::State`] each.
    pub fn replica_observer(
        &self,
        module: String,
        revision: u64,
        replica: u32,
    ) -> crate::lifecycle::Observer {
        let hub = self.clone();
        crate::lifecycle::Observer::new(move |t: &Transition<'_>| {
            hub.emit(Event::State {
                module: module.clone(),
                revision,
                replica,
                from: t.from,
                to: t.to,
                reason: t.reason.map(str::to_owned),
                pid: t.pid,
                restarts: t.restarts,
            })
        })
    }
}

/// The events the install and release pipelines emit, in one line each
/// where they happen.
impl super::actor::Actor {
    /// `installed`: the run `generation` of `name` is on disk.
    pub(super) fn emit_installed(&self, name: &str, generation: u64) {
        if let Some(run) = self.modules.get(name).and_then(|m| m.run(generation)) {
            self.events.emit(Event::Installed {
                module: name.to_owned(),
                version: run.record.version.clone(),
                revision: run.revision,
            });
        }
    }

    /// A step of `name`'s rollout in progress (`started`, a phase, an
    /// outcome).
    pub(super) fn emit_rollout(&self, name: &str, step: &str, reason: Option<&str>) {
        if let Some(ro) = self.modules.get(name).and_then(|m| m.rollout.as_ref()) {
            self.events.emit(Event::Rollout {
                module: name.to_owned(),
                revision: ro.to_revision,
                from_revision: ro.from_revision,
                step: step.to_owned(),
                reason: reason.map(str::to_owned),
            });
        }
    }
}

/// `2026-12-05T21:00:00.123Z`.
fn timestamp(t: SystemTime) -> String {
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    // `YYYY-MM-DDTHH:MM:SS.mmmZ …`: the stamp is the first 24 bytes.
    let line = super::os::format_line(since, "", None, "", "");
    line[..24].to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installed(module: &str) -> Event {
        Event::Installed {
            module: module.into(),
            version: "1.0.0".into(),
            revision: 1,
        }
    }

    #[test]
    fn events_are_numbered_in_order_and_flattened_on_the_wire() {
        let hub = EventHub::new(8);
        hub.emit(installed("early"));
        let follow = hub.follow();
        assert_eq!((follow.last_seq, follow.capacity), (1, 8));
        let mut rx = follow.rx;
        hub.emit(installed("a"));
        hub.emit(Event::Pool {
            what: "miss",
            pid: None,
        });
        let a = rx.try_recv().unwrap();
        let b = rx.try_recv().unwrap();
        assert_eq!((a.seq, b.seq), (2, 3));
        assert_eq!(hub.last_seq(), 3);
        let v = serde_json::to_value(&*a).unwrap();
        assert_eq!(v["kind"], "installed");
        assert_eq!(v["module"], "a");
        assert_eq!(v["seq"], 2);
        let id = v["daemon"].as_str().unwrap();
        assert!(id.starts_with(&format!("{}-", std::process::id())), "{id}");
        let time = v["time"].as_str().unwrap();
        assert_eq!(time.len(), 24, "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[10] == b'T', "{time}");
        assert_eq!(b.event.module(), None);
        assert_eq!(
            serde_json::to_value(&*b).unwrap(),
            serde_json::json!({
                "seq": 3, "daemon": daemon_id(), "time": b.time, "kind": "pool", "what": "miss"
            })
        );
    }

    #[test]
    fn a_subscriber_that_falls_behind_is_told_how_many_it_missed() {
        let hub = EventHub::new(4);
        let mut slow = hub.subscribe();
        for i in 0..10 {
            hub.emit(installed(&format!("m{i}")));
        }
        // The emitter never waited; the reader learns what it lost.
        match slow.try_recv() {
            Err(broadcast::error::TryRecvError::Lagged(n)) => assert_eq!(n, 6),
            other => panic!("{other:?}"),
        }
        assert_eq!(slow.try_recv().unwrap().seq, 7);
    }

    #[test]
    fn a_replica_observer_emits_state_events() {
        let hub = EventHub::new(8);
        let mut rx = hub.subscribe();
        let observer = hub.replica_observer("greeter".into(), 3, 0);
        observer.notify(&Transition {
            from: State::Running,
            to: State::BackOff,
            reason: Some("worker killed by signal 9 (SIGKILL)"),
            pid: Some(42),
            restarts: 0,
        });
        let r = rx.try_recv().unwrap();
        let v = serde_json::to_value(&*r).unwrap();
        assert_eq!(v["kind"], "state");
        assert_eq!(v["from"], "running");
        assert_eq!(v["to"], "backoff");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["revision"], 3);
        assert_eq!(r.event.module(), Some("greeter"));
    }
}
