//! Counters emberd keeps for its Prometheus endpoint (`/metrics`, see
//! `daemon::scrape`): latency histograms with fixed buckets, kept by their
//! owners (a replica's [`crate::lifecycle::Lifecycle`], the pool task) as
//! plain values and copied out in snapshots, and the control calls counted
//! by the control socket.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds, in seconds, of the latency buckets (start-up and fork
/// latencies): from half a millisecond (a warm launch) to half a minute (a
/// module that loads a lot before it is ready). Observations above the last
/// one land in the `+Inf` bucket.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// A latency histogram over [`LATENCY_BUCKETS`]: a plain value its owner
/// updates and copies out (no lock, no allocation).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latencies {
    /// Observations per bucket (not cumulative); the last is `+Inf`.
    counts: [u64; LATENCY_BUCKETS.len() + 1],
    /// Sum of the observations, in nanoseconds.
    sum_ns: u64,
    count: u64,
}

impl Latencies {
    /// Records one latency.
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.counts[i] += 1;
        self.sum_ns = self
            .sum_ns
            .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.count += 1;
    }

    /// Adds another histogram's observations to this one.
    pub fn merge(&mut self, other: &Latencies) {
        for (a, b) in self.counts.iter_mut().zip(other.counts) {
            *a += b;
        }
        self.sum_ns = self.sum_ns.saturating_add(other.sum_ns);
        self.count += other.count;
    }

    /// How many latencies were recorded.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Their sum, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_ns as f64 / 1e9
    }

    /// Each bucket's upper bound (seconds, the last `+Inf`) and how many
    /// observations fell in it (not cumulative), as the encoder takes them.
    pub fn buckets(&self) -> Vec<(f64, u64)> {
        LATENCY_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(self.counts)
            .collect()
    }
}

/// The Varlink methods counted under their own name; any other (an unknown
/// method a client made up) is counted as `other`, so a client cannot grow
/// the metric without bound.
const METHODS: &[&str] = &[
    "io.ember.Supervisor.Install",
    "io.ember.Supervisor.Uninstall",
    "io.ember.Supervisor.List",
    "io.ember.Supervisor.Status",
    "io.ember.Supervisor.Health",
    "io.ember.Supervisor.Pool",
    "io.ember.Supervisor.Logs",
    "io.ember.Supervisor.Deploy",
    "io.ember.Supervisor.Rollback",
    "io.ember.Supervisor.History",
    "io.ember.Supervisor.Rollout",
    "io.ember.Supervisor.Events",
    "org.varlink.service.GetInfo",
    "org.varlink.service.GetInterfaceDescription",
];

/// The `method` label of a call.
pub fn method_label(method: &str) -> &'static str {
    METHODS
        .iter()
        .find(|m| **m == method)
        .copied()
        .unwrap_or("other")
}

/// Control calls answered, by method, and those answered with an error, by
/// method and error name. Updated by the control socket's connection tasks,
/// read by the scrape; both on the runtime thread, the lock is never
/// contended for long.
#[derive(Debug, Default)]
pub struct ControlCalls {
    counts: Mutex<CallTable>,
}

#[derive(Debug, Default, Clone)]
struct CallTable {
    calls: BTreeMap<&'static str, u64>,
    errors: BTreeMap<(&'static str, &'static str), u64>,
}

/// A copy of [`ControlCalls`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CallCounts {
    /// Calls by method.
    pub calls: Vec<(&'static str, u64)>,
    /// Errors by method and error name.
    pub errors: Vec<((&'static str, &'static str), u64)>,
}

impl ControlCalls {
    /// Counts one call of `method` (as sent), answered with `error` (a
    /// Varlink error name: a fixed set) or not.
    pub fn record(&self, method: &str, error: Option<&'static str>) {
        let method = method_label(method);
        let mut t = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        *t.calls.entry(method).or_default() += 1;
        if let Some(e) = error {
            *t.errors.entry((method, e)).or_default() += 1;
        }
    }

    /// The counts so far.
    pub fn snapshot(&self) -> CallCounts {
        let t = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        CallCounts {
            calls: t.calls.iter().map(|(k, v)| (*k, *v)).collect(),
            errors: t.errors.iter().map(|(k, v)| (*k, *v)).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latencies_fall_in_their_bucket_and_merge() {
        let mut l = Latencies::default();
        l.observe(Duration::from_micros(300)); // ≤ 0.5 ms
        l.observe(Duration::from_millis(1)); // ≤ 1 ms: a bound is inclusive
        l.observe(Duration::from_millis(3)); // ≤ 5 ms
        l.observe(Duration::from_secs(100)); // +Inf
        let b = l.buckets();
        assert_eq!(b.len(), LATENCY_BUCKETS.len() + 1);
        assert_eq!(b[0], (0.0005, 1));
        assert_eq!(b[1], (0.001, 1));
        assert_eq!(b[3], (0.005, 1));
        assert_eq!(b.last().copied(), Some((f64::INFINITY, 1)));
        assert_eq!(b.iter().map(|(_, n)| n).sum::<u64>(), l.count());
        assert!((l.sum_seconds() - 100.0043).abs() < 1e-9);
        let mut m = l;
        m.merge(&l);
        assert_eq!(m.count(), 8);
        assert_eq!(m.buckets()[3], (0.005, 2));
    }

    #[test]
    fn calls_are_counted_by_a_bounded_method_label() {
        let c = ControlCalls::default();
        c.record("io.ember.Supervisor.List", None);
        c.record("io.ember.Supervisor.List", None);
        c.record(
            "io.ember.Supervisor.Status",
            Some("io.ember.Supervisor.ModuleNotFound"),
        );
        c.record(
            "made.up.Method1",
            Some("org.varlink.service.MethodNotFound"),
        );
        c.record(
            "made.up.Method2",
            Some("org.varlink.service.MethodNotFound"),
        );
        let s = c.snapshot();
        assert_eq!(
            s.calls,
            [
                ("io.ember.Supervisor.List", 2),
                ("io.ember.Supervisor.Status", 1),
                ("other", 2)
            ]
        );
        assert_eq!(
            s.errors,
            [
                (
                    (
                        "io.ember.Supervisor.Status",
                        "io.ember.Supervisor.ModuleNotFound"
                    ),
                    1
                ),
                (("other", "org.varlink.service.MethodNotFound"), 2)
            ]
        );
    }
}
