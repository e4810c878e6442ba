//! `/metrics`: emberd's Prometheus endpoint (opt-in: `metrics_address`,
//! `--metrics`).
//!
//! A scrape never blocks the state owner: the actor only copies the facts
//! it owns into a [`ActorSnapshot`] (a few numbers per replica), the pool
//! task its counters; `/proc` (memory, CPU of each worker) is read on the
//! blocking pool; the exposition is built in the connection's own task with
//! `prometheus-client`'s registry and Prometheus text encoder.
//!
//! HTTP is a minimal HTTP/1.1 responder (one request per connection, then
//! close): `GET /metrics` is answered, other paths get 404, other methods
//! 405. A connection must send its request head within [`READ_DEADLINE`]
//! and in at most [`MAX_HEAD`] bytes, and take the reply within
//! [`WRITE_DEADLINE`]; at most [`MAX_CONNECTIONS`] are served at once, each
//! in its own task. When all are taken, the connection that has waited the
//! longest for its request head is closed to make room for the new one (a
//! connection being answered is never closed): a client holding many
//! silent connections, or reconnecting as fast as they close, cannot lock
//! a scraper out.

use std::collections::HashMap;
use std::net::TcpListener as StdTcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::actor::{Actor, ActorMsg};
use super::model::Run;
use super::slots::{Slot, Slots};
use crate::lifecycle::{Lifecycle, State};
use crate::metrics::{Memory, MemoryCache};
use crate::pool::{PoolHandle, PoolStats};
use crate::prom::{CallCounts, ControlCalls, Latencies};

/// How long a client may take to send its request head (a scraper sends
/// it at once).
pub const READ_DEADLINE: Duration = Duration::from_secs(2);
/// How long a client may take to read the reply.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);
/// The largest request head read (request line and headers).
pub const MAX_HEAD: usize = 8 * 1024;
/// Most connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a scrape waits for the actor's and the pool's snapshots.
const SNAPSHOT_DEADLINE: Duration = Duration::from_secs(5);

/// One replica, as the actor sees it. Its counters cover every run of its
/// revision the module had, and every worker it ran in.
#[derive(Debug, Clone)]
pub struct ReplicaFacts {
    /// The module.
    pub module: String,
    /// The revision this replica runs.
    pub revision: u64,
    /// Replica number.
    pub replica: u32,
    /// Its state.
    pub state: State,
    /// Its worker, while one runs (of the serving run, when two runs of
    /// the revision overlap).
    pub pid: Option<i32>,
    /// Every live worker of this revision's replica (one, or two while an
    /// old run of the revision is stopping): their CPU time is added.
    pub workers: Vec<i32>,
    /// CPU time of its workers that have exited.
    pub exited_cpu_seconds: f64,
    /// Restarts so far.
    pub restarts: u64,
    /// Launches so far.
    pub launches: u64,
    /// Launch-to-ready latencies.
    pub startups: Latencies,
}

/// What one (revision, replica) counted in runs that are gone and in
/// workers that exited.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    restarts: u64,
    launches: u64,
    startups: Latencies,
    cpu_seconds: f64,
}

/// Per module: [`Totals`] by (revision, replica). Kept while the module is
/// installed, so a counter of a revision never goes back: not when a
/// worker exits (its CPU time), not when a run of the revision ends and
/// another starts (a rollback to it).
#[derive(Debug, Default)]
pub struct Counted(HashMap<(u64, u32), Totals>);

impl Counted {
    /// A run ends: its replicas' counters are kept.
    pub(super) fn retire(&mut self, run: &Run) {
        for (i, l) in run.replicas.iter().enumerate() {
            let t = self.0.entry((run.revision, i as u32)).or_default();
            t.restarts += l.restarts();
            t.launches += l.launches();
            t.startups.merge(l.startups());
        }
    }

    /// A worker of `revision`'s replica exited having used `seconds` of CPU.
    pub(super) fn exited_cpu(&mut self, revision: u64, replica: u32, seconds: f64) {
        self.0.entry((revision, replica)).or_default().cpu_seconds += seconds;
    }
}

/// What the actor answers to [`ActorMsg::Metrics`].
#[derive(Debug, Clone, Default)]
pub struct ActorSnapshot {
    /// Each module's active revision.
    pub modules: Vec<(String, u64)>,
    /// One per (module, revision, replica) with a live run.
    pub replicas: Vec<ReplicaFacts>,
}

impl Actor {
    /// The facts a scrape needs: copies, nothing read from the system.
    pub(super) fn metrics_snapshot(&self) -> ActorSnapshot {
        let mut s = ActorSnapshot::default();
        for (name, m) in &self.modules {
            s.modules.push((name.clone(), m.active().revision));
            // The serving run first: a rollback can start a new run of a
            // revision whose old run is still stopping, and a series may
            // appear only once (Prometheus refuses a scrape with
            // duplicates), so the serving run's replica gives the state
            // and pid; the counters of both are added.
            let serving = m.serving().generation;
            let runs = m
                .runs
                .iter()
                .filter(|r| r.generation == serving)
                .chain(m.runs.iter().filter(|r| r.generation != serving));
            let mut index: HashMap<(u64, u32), usize> = HashMap::new();
            for run in runs {
                for (i, l) in run.replicas.iter().enumerate() {
                    let key = (run.revision, i as u32);
                    match index.get(&key) {
                        Some(&at) => add_run(&mut s.replicas[at], l),
                        None => {
                            index.insert(key, s.replicas.len());
                            let gone = m.counted.0.get(&key).copied().unwrap_or_default();
                            s.replicas.push(facts(name, key, l, &gone));
                        }
                    }
                }
            }
        }
        s
    }
}

fn facts(
    module: &str,
    (revision, replica): (u64, u32),
    l: &Lifecycle,
    gone: &Totals,
) -> ReplicaFacts {
    let mut startups = gone.startups;
    startups.merge(l.startups());
    ReplicaFacts {
        module: module.to_owned(),
        revision,
        replica,
        state: l.state(),
        pid: l.pid(),
        workers: l.pid().into_iter().collect(),
        exited_cpu_seconds: gone.cpu_seconds,
        restarts: gone.restarts + l.restarts(),
        launches: gone.launches + l.launches(),
        startups,
    }
}

/// Another live run of the same revision's replica.
fn add_run(r: &mut ReplicaFacts, l: &Lifecycle) {
    r.workers.extend(l.pid());
    r.restarts += l.restarts();
    r.launches += l.launches();
    r.startups.merge(l.startups());
}

/// What a scrape reads from.
pub struct Sources {
    /// The state owner.
    pub actor: mpsc::Sender<ActorMsg>,
    /// The warm pool.
    pub pool: PoolHandle,
    /// Control calls counted by the control socket.
    pub calls: Arc<ControlCalls>,
    /// When emberd started.
    pub started: Instant,
    /// The same, on the wall clock.
    pub start_time: SystemTime,
    /// Worker memory readings, reused for a second (a burst of scrapes
    /// walks each worker's page tables once).
    pub memory: MemoryCache,
    /// The CPU total last shown per (module, revision, replica): a worker
    /// reaped after the actor's snapshot and before its `/proc` read is in
    /// neither, until the actor has its exit; the total shown meanwhile
    /// stays at the last one.
    pub cpu_floor: Mutex<HashMap<(String, u64, u32), f64>>,
}

/// Per-process readings of one replica's workers.
#[derive(Debug, Clone, Copy, Default)]
struct ProcFacts {
    /// Of its worker.
    memory: Option<Memory>,
    /// Total CPU time: its exited workers' and its live ones'.
    cpu_seconds: f64,
}

/// Everything one exposition shows.
#[derive(Debug)]
struct Scrape {
    actor: ActorSnapshot,
    procs: Vec<ProcFacts>,
    pool: Option<PoolStats>,
    calls: CallCounts,
    uptime: f64,
    start_time: f64,
    /// Module lines journald did not take, when module lines go there.
    journal_lost: Option<u64>,
}

/// The snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
#[error("the state owner did not answer (shutting down or overloaded)")]
struct Unavailable;

impl Sources {
    async fn scrape(self: &Arc<Self>) -> Result<String, Unavailable> {
        let (tx, rx) = oneshot::channel();
        let actor = async {
            self.actor
                .send(ActorMsg::Metrics(tx))
                .await
                .map_err(|_| Unavailable)?;
            rx.await.map_err(|_| Unavailable)
        };
        let actor = tokio::time::timeout(SNAPSHOT_DEADLINE, actor)
            .await
            .map_err(|_| Unavailable)??;
        // The pool may be restarting its zygote: its counters are then
        // left out, the rest is still shown.
        let pool = tokio::time::timeout(SNAPSHOT_DEADLINE, self.pool.stats())
            .await
            .ok()
            .and_then(Result::ok);
        let pids: Vec<(Option<i32>, Vec<i32>, f64)> = actor
            .replicas
            .iter()
            .map(|r| (r.pid, r.workers.clone(), r.exited_cpu_seconds))
            .collect();
        let me = self.clone();
        let mut procs = tokio::task::spawn_blocking(move || {
            pids.into_iter()
                .map(|(pid, workers, exited)| ProcFacts {
                    memory: pid.and_then(|pid| me.memory.memory(pid)),
                    cpu_seconds: exited
                        + workers
                            .iter()
                            .filter_map(|&w| crate::metrics::cpu_seconds(w).ok())
                            .sum::<f64>(),
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|_| Unavailable)?;
        {
            let mut floor = self.cpu_floor.lock().unwrap_or_else(|e| e.into_inner());
            let mut seen = HashMap::with_capacity(procs.len());
            for (r, p) in actor.replicas.iter().zip(&mut procs) {
                let key = (r.module.clone(), r.revision, r.replica);
                if let Some(&last) = floor.get(&key) {
                    p.cpu_seconds = p.cpu_seconds.max(last);
                }
                seen.insert(key, p.cpu_seconds);
            }
            *floor = seen;
        }
        let scrape = Scrape {
            actor,
            procs,
            pool,
            calls: self.calls.snapshot(),
            uptime: self.started.elapsed().as_secs_f64(),
            start_time: self
                .start_time
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            journal_lost: crate::journal::get().map(|j| j.lost()),
        };
        Ok(encode(scrape))
    }
}

/// The exposition, in the Prometheus text format (0.0.4).
fn encode(scrape: Scrape) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(scrape));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("writing to a String cannot fail");
    out
}

type Labels3 = [(&'static str, String); 3];

fn replica_labels(r: &ReplicaFacts) -> Labels3 {
    [
        ("module", r.module.clone()),
        ("revision", r.revision.to_string()),
        ("replica", r.replica.to_string()),
    ]
}

const STATES: [State; 9] = [
    State::Installing,
    State::Waiting,
    State::Starting,
    State::Running,
    State::Stopping,
    State::Stopped,
    State::BackOff,
    State::CrashLoop,
    State::Failed,
];

/// One family: its descriptor, then one sample per label set.
fn family<L, M>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), std::fmt::Error>
where
    L: prometheus_client::encoding::EncodeLabelSet,
    M: EncodeMetric,
{
    let mut e = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in samples {
        metric.encode(e.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One histogram family.
fn histograms<L: prometheus_client::encoding::EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, Latencies)>,
) -> Result<(), std::fmt::Error> {
    let mut e = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, h) in samples {
        e.encode_family(&labels)?.encode_histogram::<NoLabelSet>(
            h.sum_seconds(),
            h.count(),
            &h.buckets(),
            None,
        )?;
    }
    Ok(())
}

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let reps = &self.actor.replicas;
        let none: [(&str, &str); 0] = [];
        // Daemon.
        family(
            &mut enc,
            "ember_build_info",
            "emberd's version (the value is always 1)",
            MetricType::Gauge,
            [(
                [("version", env!("CARGO_PKG_VERSION"))],
                ConstGauge::new(1i64),
            )],
        )?;
        family(
            &mut enc,
            "ember_start_time_seconds",
            "When emberd started, in seconds since the Unix epoch",
            MetricType::Gauge,
            [(none, ConstGauge::new(self.start_time))],
        )?;
        family(
            &mut enc,
            "ember_uptime_seconds",
            "Seconds since emberd started",
            MetricType::Gauge,
            [(none, ConstGauge::new(self.uptime))],
        )?;
        family(
            &mut enc,
            "ember_control_calls",
            "Control socket calls answered, by method (`other`: a method emberd does not know)",
            MetricType::Counter,
            self.calls
                .calls
                .iter()
                .map(|(m, n)| ([("method", *m)], ConstCounter::new(*n))),
        )?;
        family(
            &mut enc,
            "ember_control_errors",
            "Control socket calls answered with an error, by method and Varlink error",
            MetricType::Counter,
            self.calls
                .errors
                .iter()
                .map(|((m, e), n)| ([("method", *m), ("error", *e)], ConstCounter::new(*n))),
        )?;
        if let Some(lost) = self.journal_lost {
            family(
                &mut enc,
                "ember_journal_lost_lines",
                "Module log lines journald did not take (only when module lines go to the journal)",
                MetricType::Counter,
                [(none, ConstCounter::new(lost))],
            )?;
        }
        // Modules and replicas.
        family(
            &mut enc,
            "ember_module_revision",
            "The revision each module's active run is of",
            MetricType::Gauge,
            self.actor
                .modules
                .iter()
                .map(|(m, rev)| ([("module", m.clone())], ConstGauge::new(*rev as i64))),
        )?;
        family(
            &mut enc,
            "ember_replica_state",
            "1 for the state each replica is in, 0 for the others",
            MetricType::Gauge,
            reps.iter().flat_map(|r| {
                STATES.iter().map(move |s| {
                    let [m, rev, rep] = replica_labels(r);
                    (
                        [m, rev, rep, ("state", s.as_str().to_owned())],
                        ConstGauge::new(i64::from(r.state == *s)),
                    )
                })
            }),
        )?;
        family(
            &mut enc,
            "ember_replica_restarts",
            "Restarts of each replica after a crash, a failure or a missed start deadline",
            MetricType::Counter,
            reps.iter()
                .map(|r| (replica_labels(r), ConstCounter::new(r.restarts))),
        )?;
        family(
            &mut enc,
            "ember_replica_launches",
            "Launches of each replica into a worker (its first start and every restart)",
            MetricType::Counter,
            reps.iter()
                .map(|r| (replica_labels(r), ConstCounter::new(r.launches))),
        )?;
        let with_procs = || reps.iter().zip(&self.procs);
        for (name, help, pick) in [
            (
                "ember_replica_memory_rss_bytes",
                "Resident set size of each replica's worker",
                (|m: &Memory| m.rss) as fn(&Memory) -> u64,
            ),
            (
                "ember_replica_memory_pss_bytes",
                "Proportional set size of each replica's worker (shared pages divided among their sharers)",
                |m: &Memory| m.pss,
            ),
            (
                "ember_replica_memory_uss_bytes",
                "Unique set size of each replica's worker (its private pages)",
                |m: &Memory| m.uss,
            ),
        ] {
            family(
                &mut enc,
                name,
                help,
                MetricType::Gauge,
                with_procs().filter_map(|(r, p)| {
                    Some((replica_labels(r), ConstGauge::new(pick(p.memory.as_ref()?))))
                }),
            )?;
        }
        family(
            &mut enc,
            "ember_replica_cpu_seconds",
            "User and system CPU time of each replica's workers, the exited ones included",
            MetricType::Counter,
            with_procs().map(|(r, p)| (replica_labels(r), ConstCounter::new(p.cpu_seconds))),
        )?;
        // In the order the replicas come (a module's revisions together).
        let mut order: Vec<(&str, u64)> = Vec::new();
        let mut startups: HashMap<(&str, u64), Latencies> = HashMap::new();
        for r in reps {
            let key = (r.module.as_str(), r.revision);
            startups
                .entry(key)
                .or_insert_with(|| {
                    order.push(key);
                    Latencies::default()
                })
                .merge(&r.startups);
        }
        histograms(
            &mut enc,
            "ember_module_startup_seconds",
            "Time from a launch to the module's readiness, by module and revision (every launch while the module is installed)",
            order.into_iter().map(|(m, rev)| {
                (
                    [("module", m.to_owned()), ("revision", rev.to_string())],
                    startups[&(m, rev)],
                )
            }),
        )?;
        // Pool.
        if let Some(p) = &self.pool {
            let one = |v: u64| [(none, ConstCounter::new(v))];
            family(
                &mut enc,
                "ember_pool_idle_workers",
                "Warm workers waiting for a launch",
                MetricType::Gauge,
                [(none, ConstGauge::new(p.idle as i64))],
            )?;
            family(
                &mut enc,
                "ember_pool_hits",
                "Launches served by an idle warm worker",
                MetricType::Counter,
                one(p.hits),
            )?;
            family(
                &mut enc,
                "ember_pool_misses",
                "Launches that found no idle worker and waited for a fork",
                MetricType::Counter,
                one(p.misses),
            )?;
            family(
                &mut enc,
                "ember_pool_refills",
                "Workers forked ahead of time into the pool",
                MetricType::Counter,
                one(p.refills),
            )?;
            family(
                &mut enc,
                "ember_pool_forks",
                "Workers forked (refills and misses)",
                MetricType::Counter,
                one(p.fork_latency.count()),
            )?;
            family(
                &mut enc,
                "ember_pool_fork_failures",
                "Forks that failed",
                MetricType::Counter,
                one(p.fork_failures),
            )?;
            histograms(
                &mut enc,
                "ember_pool_fork_seconds",
                "Time to fork a worker and receive its handshake",
                [(none, p.fork_latency)],
            )?;
            family(
                &mut enc,
                "ember_zygote_restarts",
                "Times the zygote died and was started again",
                MetricType::Counter,
                one(p.zygote_restarts),
            )?;
        }
        Ok(())
    }
}

/// Accepts scrape connections forever, each in its own task.
pub async fn serve(listener: StdTcpListener, sources: Arc<Sources>) {
    let listener = match TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the metrics listener");
            return;
        }
    };
    let slots = Slots::new(MAX_CONNECTIONS);
    loop {
        let (stream, slot) = slots
            .accept(
                || listener.accept(),
                "metrics accept failed",
                "too many metrics connections, all being answered; closing a new one",
            )
            .await;
        let sources = sources.clone();
        tokio::spawn(async move {
            connection(stream, &sources, &slot).await;
        });
    }
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    MethodNotAllowed,
    BadRequest,
}

/// Routes a complete request head (through its blank line).
fn route(head: &[u8]) -> Route {
    let Some(line) = head.split(|&b| b == b'\n').next() else {
        return Route::BadRequest;
    };
    let line = String::from_utf8_lossy(line);
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() {
        return Route::BadRequest;
    }
    if method != "GET" {
        return Route::MethodNotAllowed;
    }
    let path = target.split('?').next().unwrap_or_default();
    if path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

/// Why a request head was not read.
#[derive(Debug)]
enum HeadError {
    /// Longer than [`MAX_HEAD`].
    TooLarge,
    /// The connection failed.
    Io,
}

/// Reads the request head: `Ok(None)` when the client closed first.
async fn read_head(stream: &mut TcpStream) -> Result<Option<Vec<u8>>, HeadError> {
    let mut head = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    loop {
        let n = stream.read(&mut buf).await.map_err(|_| HeadError::Io)?;
        if n == 0 {
            return Ok(None);
        }
        let from = head.len().saturating_sub(3);
        head.extend_from_slice(&buf[..n]);
        if head[from..].windows(4).any(|w| w == b"\r\n\r\n")
            || head[from..].windows(2).any(|w| w == b"\n\n")
        {
            return Ok(Some(head));
        }
        if head.len() > MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
    }
}

fn response(status: &str, extra: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

async fn connection(mut stream: TcpStream, sources: &Arc<Sources>, slot: &Slot) {
    let text = "text/plain; charset=utf-8";
    let head = tokio::select! {
        head = tokio::time::timeout(READ_DEADLINE, read_head(&mut stream)) => head,
        // Evicted for a newer connection: closed without a reply.
        () = slot.evict.notified() => return,
    };
    slot.set_idle(false);
    let reply = match head {
        Err(_) => response(
            "408 Request Timeout",
            "",
            text,
            "request head not received in time\n",
        ),
        Ok(Ok(None)) => return,
        Ok(Err(HeadError::TooLarge)) => response(
            "431 Request Header Fields Too Large",
            "",
            text,
            "request head too large\n",
        ),
        Ok(Err(HeadError::Io)) => return,
        Ok(Ok(Some(head))) => match route(&head) {
            Route::Metrics => match sources.scrape().await {
                Ok(body) => response(
                    "200 OK",
                    "",
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    &body,
                ),
                Err(e) => response("503 Service Unavailable", "", text, &format!("{e}\n")),
            },
            Route::NotFound => response("404 Not Found", "", text, "not found: try /metrics\n"),
            Route::MethodNotAllowed => response(
                "405 Method Not Allowed",
                "Allow: GET\r\n",
                text,
                "only GET is served\n",
            ),
            Route::BadRequest => response("400 Bad Request", "", text, "not an HTTP/1 request\n"),
        },
    };
    let _ = tokio::time::timeout(WRITE_DEADLINE, async {
        stream.write_all(&reply).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_requests() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(
            route(b"POST /metrics HTTP/1.1\r\n\r\n"),
            Route::MethodNotAllowed
        );
        assert_eq!(route(b"GET /metrics\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SPDY/3\r\n\r\n"), Route::BadRequest);
        assert_eq!(route(b"\r\n\r\n"), Route::BadRequest);
    }

    #[test]
    fn encodes_every_family_with_labels() {
        let mut startups = Latencies::default();
        startups.observe(Duration::from_millis(2));
        let r = ReplicaFacts {
            module: "hello".into(),
            revision: 3,
            replica: 1,
            state: State::Running,
            pid: Some(42),
            workers: vec![42],
            exited_cpu_seconds: 0.25,
            restarts: 2,
            launches: 3,
            startups,
        };
        let calls = ControlCalls::default();
        calls.record("io.ember.Supervisor.List", None);
        let text = encode(Scrape {
            actor: ActorSnapshot {
                modules: vec![("hello".into(), 3)],
                replicas: vec![r],
            },
            procs: vec![ProcFacts {
                memory: Some(Memory {
                    rss: 300,
                    pss: 200,
                    uss: 100,
                }),
                cpu_seconds: 0.5,
            }],
            pool: Some(PoolStats::default()),
            calls: calls.snapshot(),
            uptime: 1.5,
            start_time: 1e9,
            journal_lost: Some(4),
        });
        for line in [
            "# TYPE ember_replica_restarts_total counter",
            r#"ember_replica_restarts_total{module="hello",revision="3",replica="1"} 2"#,
            r#"ember_replica_launches_total{module="hello",revision="3",replica="1"} 3"#,
            r#"ember_replica_state{module="hello",revision="3",replica="1",state="running"} 1"#,
            r#"ember_replica_state{module="hello",revision="3",replica="1",state="crashloop"} 0"#,
            r#"ember_replica_memory_uss_bytes{module="hello",revision="3",replica="1"} 100"#,
            r#"ember_replica_cpu_seconds_total{module="hello",revision="3",replica="1"} 0.5"#,
            r#"ember_module_startup_seconds_bucket{module="hello",revision="3",le="0.002"} 1"#,
            r#"ember_module_startup_seconds_bucket{module="hello",revision="3",le="0.001"} 0"#,
            r#"ember_module_startup_seconds_count{module="hello",revision="3"} 1"#,
            r#"ember_module_revision{module="hello"} 3"#,
            r#"ember_control_calls_total{method="io.ember.Supervisor.List"} 1"#,
            "ember_uptime_seconds 1.5",
            "ember_pool_hits_total 0",
            "ember_pool_fork_seconds_count 0",
            "ember_zygote_restarts_total 0",
            "ember_journal_lost_lines_total 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
