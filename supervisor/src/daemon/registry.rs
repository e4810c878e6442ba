//! The service registry: which worker may talk to which. For each
//! (importing instance, service) it keeps one channel to one exporting
//! instance, created here and handed out in two ends, one to each worker;
//! nobody else ever gets either. A security boundary: a worker only ever
//! receives ends of services its manifest imports or exports.
//!
//! Releases move importers between exporter instances: to a new revision's
//! instance once it is ready (never before), and away from an instance that
//! is told to stop or exits, to another running one if there is one. The
//! importer's SDK client switches to the newest end by itself; the old
//! exporter drains the calls still in flight on the old end.
//!
//! What the registry needs to know about modules comes through
//! [`Directory`], so its decisions are unit-tested over a small fake.

use std::collections::HashMap;

use super::os::{Command, CommandTx, ServiceGrant};
use crate::error_chain;
use crate::worker::{Grant, GrantKind, ToWorker};

/// A worker that got (or is about to get) its launch order.
#[derive(Debug)]
pub(super) struct Live {
    /// Module name.
    pub module: String,
    /// The generation of the module's run (one per revision started).
    pub generation: u64,
    /// Replica number.
    pub replica: u32,
    /// Where its commands go.
    pub commands: CommandTx,
}

/// How far an exporter instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Serving {
    /// Ready and not asked to stop.
    Ready,
    /// Launched, not ready yet.
    Starting,
    /// Asked to stop, exited, or of a run that is gone.
    No,
}

/// What the registry asks about modules.
pub(super) trait Directory {
    /// The services a run of `module` exports and imports; `None` if that
    /// run no longer exists.
    fn services(&self, module: &str, generation: u64) -> Option<(&[String], &[String])>;
    /// Where the instance behind `pid` is.
    fn serving(&self, pid: i32, live: &Live) -> Serving;
    /// Whether this run is the one importers should use (a rollout's
    /// target once it is ready, else the active run).
    fn preferred(&self, module: &str, generation: u64) -> bool;
}

/// Registered workers and wired imports.
#[derive(Debug, Default)]
pub(super) struct Registry {
    live: HashMap<i32, Live>,
    /// (importer pid, service) → exporter pid.
    wired: HashMap<(i32, String), i32>,
}

impl Registry {
    /// The registered worker behind `pid`.
    pub fn get(&self, pid: i32) -> Option<&Live> {
        self.live.get(&pid)
    }

    /// The exporter `importer`'s `service` is wired to.
    pub fn exporter_of(&self, importer: i32, service: &str) -> Option<i32> {
        self.wired.get(&(importer, service.to_owned())).copied()
    }

    /// The best exporter instance of `service` other than those in
    /// `except`: a ready one of a preferred run, else any ready one, else
    /// (so an importer starting beside a starting exporter is wired at
    /// once) a starting one.
    fn pick(&self, service: &str, dir: &impl Directory, except: &[i32]) -> Option<i32> {
        let mut best: Option<(u8, i32)> = None;
        for (&pid, l) in &self.live {
            if except.contains(&pid) {
                continue;
            }
            let Some((exports, _)) = dir.services(&l.module, l.generation) else {
                continue;
            };
            if !exports.iter().any(|s| s == service) {
                continue;
            }
            let rank = match (dir.serving(pid, l), dir.preferred(&l.module, l.generation)) {
                (Serving::Ready, true) => 3,
                (Serving::Ready, false) => 2,
                (Serving::Starting, _) => 1,
                (Serving::No, _) => continue,
            };
            // Ties go to the lowest pid, so the choice is stable.
            if best.is_none_or(|(r, p)| rank > r || (rank == r && pid < p)) {
                best = Some((rank, pid));
            }
        }
        best.map(|(_, pid)| pid)
    }

    /// Registers a worker about to be launched and returns the service ends
    /// for its launch order: for each service it imports, a channel to the
    /// best exporter instance (whose end is attached to it); for each
    /// service it exports, a channel to every importer instance that has no
    /// usable exporter yet. Importers already served are moved to it once
    /// it is ready ([`Registry::exporter_ready`]), not before.
    pub fn register(&mut self, pid: i32, me: Live, dir: &impl Directory) -> Vec<ServiceGrant> {
        let Some((exports, imports)) = dir.services(&me.module, me.generation) else {
            return Vec::new();
        };
        let (exports, imports) = (exports.to_vec(), imports.to_vec());
        let mut grants = Vec::new();
        for service in &imports {
            let Some(epid) = self.pick(service, dir, &[pid]) else {
                tracing::info!(
                    module = me.module,
                    replica = me.replica,
                    service,
                    "import waits for its exporter"
                );
                continue;
            };
            match wire(service, &self.live[&epid].commands, GrantKind::Export) {
                Ok(g) => {
                    grants.push(g);
                    self.wired.insert((pid, service.clone()), epid);
                }
                Err(reason) => {
                    tracing::warn!(module = me.module, service, %reason, "cannot wire import")
                }
            }
        }
        for service in &exports {
            for ipid in self.unserved_importers(service, dir) {
                let tx = &self.live[&ipid].commands;
                match wire(service, tx, GrantKind::Import) {
                    Ok(g) => {
                        grants.push(g);
                        tracing::info!(importer = self.live[&ipid].module, service, exporter = %me.module, "import wired");
                        self.wired.insert((ipid, service.clone()), pid);
                    }
                    Err(reason) => tracing::warn!(service, %reason, "cannot wire import"),
                }
            }
        }
        self.live.insert(pid, me);
        grants
    }

    /// Importer instances of `service` whose exporter is not serving.
    fn unserved_importers(&self, service: &str, dir: &impl Directory) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .live
            .iter()
            .filter(|(_, l)| {
                dir.services(&l.module, l.generation)
                    .is_some_and(|(_, imports)| imports.iter().any(|s| s == service))
            })
            .filter(|(&ipid, _)| {
                self.exporter_of(ipid, service).is_none_or(|e| {
                    self.live
                        .get(&e)
                        .is_none_or(|l| dir.serving(e, l) == Serving::No)
                })
            })
            .map(|(&p, _)| p)
            .filter(|p| dir.serving(*p, &self.live[p]) != Serving::No)
            .collect();
        v.sort_unstable();
        v
    }

    /// Wires a new channel between a running importer and a running
    /// exporter: both ends are attached to their workers.
    fn rewire(&mut self, importer: i32, service: &str, exporter: i32) {
        let (Some(i), Some(e)) = (self.live.get(&importer), self.live.get(&exporter)) else {
            return;
        };
        match attach_pair(service, &i.commands, &e.commands) {
            Ok(()) => {
                tracing::info!(
                    importer = i.module,
                    replica = i.replica,
                    service,
                    exporter = e.module,
                    exporter_pid = exporter,
                    "import moved"
                );
                self.wired.insert((importer, service.to_owned()), exporter);
            }
            Err(reason) => tracing::warn!(service, %reason, "cannot move import"),
        }
    }

    /// An exporter instance became ready. If its run is the preferred one
    /// (a release's new revision), importers wired to instances of other
    /// runs of the same module move to it; importers without a serving
    /// exporter are wired to it in any case.
    pub fn exporter_ready(&mut self, pid: i32, dir: &impl Directory) {
        let Some(me) = self.live.get(&pid) else {
            return;
        };
        let Some((exports, _)) = dir.services(&me.module, me.generation) else {
            return;
        };
        let (module, generation, exports) = (me.module.clone(), me.generation, exports.to_vec());
        let preferred = dir.preferred(&module, generation);
        for service in &exports {
            let mut moving: Vec<i32> = self
                .wired
                .iter()
                .filter(|((_, s), _)| s == service)
                .filter(|(_, &e)| e != pid)
                .filter(|(_, e)| {
                    preferred
                        && self
                            .live
                            .get(e)
                            .is_some_and(|l| l.module == module && l.generation != generation)
                })
                .map(|((i, _), _)| *i)
                .collect();
            moving.extend(self.unserved_importers(service, dir));
            moving.sort_unstable();
            moving.dedup();
            for importer in moving {
                if importer != pid {
                    self.rewire(importer, service, pid);
                }
            }
        }
    }

    /// Exporter instances in `stopping` are about to be asked to stop:
    /// importers wired to them move to another exporter instance that
    /// serves (if none does, they keep the old channel, which drains).
    pub fn exporters_stopping(&mut self, stopping: &[i32], dir: &impl Directory) {
        let moving: Vec<(i32, String)> = self
            .wired
            .iter()
            .filter(|(_, e)| stopping.contains(e))
            .map(|((i, s), _)| (*i, s.clone()))
            .collect();
        for (importer, service) in moving {
            if let Some(e) = self.pick(&service, dir, stopping) {
                if self
                    .live
                    .get(&e)
                    .is_some_and(|l| dir.serving(e, l) == Serving::Ready)
                {
                    self.rewire(importer, &service, e);
                }
            }
        }
    }

    /// Forgets an exited worker: the imports it had wired, and the imports
    /// wired to it, which move to another serving exporter instance if
    /// there is one (else they wait until one registers).
    pub fn unregister(&mut self, pid: i32, dir: &impl Directory) -> Option<Live> {
        let gone = self.live.remove(&pid);
        self.wired.retain(|(i, _), _| *i != pid);
        let orphaned: Vec<(i32, String)> = self
            .wired
            .iter()
            .filter(|(_, e)| **e == pid)
            .map(|((i, s), _)| (*i, s.clone()))
            .collect();
        for (importer, service) in orphaned {
            self.wired.remove(&(importer, service.clone()));
            // Only to one that serves: a starting one may never be ready;
            // the import waits instead and is wired when an exporter
            // registers or becomes ready.
            if let Some(e) = self.pick(&service, dir, &[pid]) {
                if self
                    .live
                    .get(&e)
                    .is_some_and(|l| dir.serving(e, l) == Serving::Ready)
                {
                    self.rewire(importer, &service, e);
                }
            }
        }
        gone
    }
}

/// Makes one channel for `service`: the end of kind `peer_kind` is attached
/// to the running worker behind `peer`, the other end is returned as a
/// grant for the worker being launched.
fn wire(service: &str, peer: &CommandTx, peer_kind: GrantKind) -> Result<ServiceGrant, String> {
    let (client, server) =
        shm_ipc::channel::channel_pair(&shm_ipc::channel::ChannelConfig::default())
            .map_err(|e| error_chain(&e))?;
    let (client, server) = (client.into_fds(), server.into_fds());
    let (theirs, mine, my_kind) = match peer_kind {
        GrantKind::Export => (server, client, GrantKind::Import),
        _ => (client, server, GrantKind::Export),
    };
    attach(peer, peer_kind, service, theirs)?;
    Ok(ServiceGrant {
        grant: Grant {
            kind: my_kind,
            name: service.to_owned(),
        },
        fds: vec![mine.0, mine.1],
    })
}

/// Makes one channel for `service` between two running workers: the
/// exporter gets its server end first, so the importer's first call on the
/// new end finds it served.
fn attach_pair(service: &str, importer: &CommandTx, exporter: &CommandTx) -> Result<(), String> {
    let (client, server) =
        shm_ipc::channel::channel_pair(&shm_ipc::channel::ChannelConfig::default())
            .map_err(|e| error_chain(&e))?;
    attach(exporter, GrantKind::Export, service, server.into_fds())?;
    attach(importer, GrantKind::Import, service, client.into_fds())
}

fn attach(
    peer: &CommandTx,
    kind: GrantKind,
    service: &str,
    fds: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
) -> Result<(), String> {
    peer.send(Command {
        msg: ToWorker::Attach(vec![Grant {
            kind,
            name: service.to_owned(),
        }]),
        fds: vec![fds.0, fds.1],
    })
    .map_err(|_| "the peer worker is gone".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use tokio::sync::mpsc;

    /// Modules by (name, generation): exports, imports; per-pid serving
    /// state; preferred runs.
    #[derive(Default)]
    struct Fake {
        runs: HashMap<(String, u64), (Vec<String>, Vec<String>)>,
        serving: HashMap<i32, Serving>,
        preferred: HashSet<(String, u64)>,
    }

    impl Directory for Fake {
        fn services(&self, module: &str, generation: u64) -> Option<(&[String], &[String])> {
            self.runs
                .get(&(module.to_owned(), generation))
                .map(|(e, i)| (e.as_slice(), i.as_slice()))
        }
        fn serving(&self, pid: i32, _: &Live) -> Serving {
            self.serving.get(&pid).copied().unwrap_or(Serving::No)
        }
        fn preferred(&self, module: &str, generation: u64) -> bool {
            self.preferred.contains(&(module.to_owned(), generation))
        }
    }

    type Inbox = mpsc::UnboundedReceiver<Command>;

    fn live(module: &str, generation: u64) -> (Live, Inbox) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Live {
                module: module.into(),
                generation,
                replica: 0,
                commands: tx,
            },
            rx,
        )
    }

    /// The grants attached to a worker since the last look.
    fn attached(rx: &mut Inbox) -> Vec<(GrantKind, String, usize)> {
        let mut v = Vec::new();
        while let Ok(c) = rx.try_recv() {
            if let ToWorker::Attach(gs) = c.msg {
                for g in gs {
                    v.push((g.kind, g.name, c.fds.len()));
                }
            }
        }
        v
    }

    fn world() -> Fake {
        let mut f = Fake::default();
        let kv = (vec!["kv".to_owned()], Vec::new());
        f.runs.insert(("kv".into(), 1), kv.clone());
        f.runs.insert(("kv".into(), 2), kv);
        f.runs
            .insert(("greeter".into(), 5), (Vec::new(), vec!["kv".to_owned()]));
        f.runs.insert(("hello".into(), 7), (Vec::new(), Vec::new()));
        f.preferred.insert(("kv".into(), 1));
        f
    }

    #[test]
    fn an_importer_is_wired_to_a_serving_exporter_and_nobody_else_gets_an_end() {
        let mut dir = world();
        let mut r = Registry::default();
        let (kv, mut kv_rx) = live("kv", 1);
        assert!(r.register(100, kv, &dir).is_empty());
        dir.serving.insert(100, Serving::Ready);
        let (hello, mut hello_rx) = live("hello", 7);
        assert!(r.register(300, hello, &dir).is_empty());
        dir.serving.insert(300, Serving::Ready);
        let (g, _g_rx) = live("greeter", 5);
        let grants = r.register(200, g, &dir);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].grant.kind, GrantKind::Import);
        assert_eq!(grants[0].fds.len(), 2);
        assert_eq!(attached(&mut kv_rx), [(GrantKind::Export, "kv".into(), 2)]);
        assert_eq!(r.exporter_of(200, "kv"), Some(100));
        // hello neither imports nor exports kv: it gets nothing.
        assert!(attached(&mut hello_rx).is_empty());
    }

    #[test]
    fn a_new_revision_takes_importers_only_once_ready_and_the_old_one_is_left() {
        let mut dir = world();
        let mut r = Registry::default();
        let (kv1, mut kv1_rx) = live("kv", 1);
        r.register(100, kv1, &dir);
        dir.serving.insert(100, Serving::Ready);
        let (g, mut g_rx) = live("greeter", 5);
        assert_eq!(r.register(200, g, &dir).len(), 1);
        dir.serving.insert(200, Serving::Ready);
        attached(&mut kv1_rx);
        // The release starts kv generation 2: registered, starting, the
        // rollout's target.
        dir.preferred.insert(("kv".into(), 2));
        let (kv2, mut kv2_rx) = live("kv", 2);
        assert!(
            r.register(101, kv2, &dir).is_empty(),
            "importers are served"
        );
        dir.serving.insert(101, Serving::Starting);
        assert_eq!(r.exporter_of(200, "kv"), Some(100));
        assert!(attached(&mut g_rx).is_empty());
        // Ready: greeter gets a new client end, kv2 the server end first.
        dir.serving.insert(101, Serving::Ready);
        r.exporter_ready(101, &dir);
        assert_eq!(r.exporter_of(200, "kv"), Some(101));
        assert_eq!(attached(&mut kv2_rx), [(GrantKind::Export, "kv".into(), 2)]);
        assert_eq!(attached(&mut g_rx), [(GrantKind::Import, "kv".into(), 2)]);
        assert!(attached(&mut kv1_rx).is_empty());
    }

    #[test]
    fn importers_leave_an_exporter_that_stops_or_exits_for_one_that_serves() {
        let mut dir = world();
        let mut r = Registry::default();
        let mut inboxes = Vec::new();
        for (pid, gen) in [(100, 1), (101, 2)] {
            let (kv, rx) = live("kv", gen);
            inboxes.push(rx);
            r.register(pid, kv, &dir);
            dir.serving.insert(pid, Serving::Ready);
        }
        let (g, mut g_rx) = live("greeter", 5);
        r.register(200, g, &dir);
        dir.serving.insert(200, Serving::Ready);
        // Generation 1 is preferred: wired there.
        assert_eq!(r.exporter_of(200, "kv"), Some(100));
        r.exporters_stopping(&[100], &dir);
        assert_eq!(r.exporter_of(200, "kv"), Some(101));
        assert_eq!(attached(&mut g_rx).len(), 1);
        // 101 exits: nobody else serves, the import waits.
        dir.serving.insert(100, Serving::No);
        assert!(r.unregister(101, &dir).is_some());
        assert_eq!(r.exporter_of(200, "kv"), None);
        assert!(attached(&mut g_rx).is_empty());
        // A new exporter registering wires the waiting importer at once.
        let (kv3, _kv3_rx) = live("kv", 1);
        assert_eq!(r.register(102, kv3, &dir).len(), 1);
        assert_eq!(r.exporter_of(200, "kv"), Some(102));
    }

    #[test]
    fn stale_runs_are_neither_wired_nor_picked() {
        let mut dir = world();
        let mut r = Registry::default();
        let (kv, _) = live("kv", 9);
        assert!(r.register(100, kv, &dir).is_empty());
        dir.serving.insert(100, Serving::Ready);
        let (g, _) = live("greeter", 5);
        assert!(r.register(200, g, &dir).is_empty());
        assert_eq!(r.exporter_of(200, "kv"), None);
    }
}
