//! The service registry: which worker may talk to which. For each
//! (importing instance, service) it keeps a channel to every exporting
//! instance that serves the service at the version the importer asks for,
//! each created here and handed out in two ends, one to each worker;
//! nobody else ever gets either. A security boundary: a worker only ever
//! receives ends of services its manifest imports or exports.
//!
//! An importer gets a channel to each exporter instance once that instance
//! is ready (never before, so no call waits on a replica still starting),
//! except when none is: then it is wired to the starting ones, so its
//! first call does not wait for a second round. The importer's SDK client
//! spreads its calls over the channels, adopts the ones attached later and
//! leaves those whose exporter drains or dies; an exporter's death un-wires
//! it here, so `Status` shows an import `wired` only while a channel to a
//! running exporter exists.
//!
//! What the registry needs to know about modules comes through
//! [`Directory`], so its decisions are unit-tested over a small fake.

use std::collections::HashMap;

use super::os::{Command, CommandTx, ServiceGrant};
use crate::error_chain;
use crate::manifest::ServiceRef;
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
    fn services(&self, module: &str, generation: u64) -> Option<(&[ServiceRef], &[ServiceRef])>;
    /// Where the instance behind `pid` is.
    fn serving(&self, pid: i32, live: &Live) -> Serving;
}

/// Registered workers and wired imports.
#[derive(Debug, Default)]
pub(super) struct Registry {
    live: HashMap<i32, Live>,
    /// (importer pid, service name) → the exporter instances it has a
    /// channel to, in the order wired.
    wired: HashMap<(i32, String), Vec<i32>>,
}

impl Registry {
    /// The registered worker behind `pid`.
    pub fn get(&self, pid: i32) -> Option<&Live> {
        self.live.get(&pid)
    }

    /// The exporter instances `importer`'s `service` has a channel to.
    pub fn exporters_of(&self, importer: i32, service: &str) -> &[i32] {
        self.wired
            .get(&(importer, service.to_owned()))
            .map_or(&[], Vec::as_slice)
    }

    /// The registered instances that export `want` (name and version) and
    /// are in state `state`, by pid.
    fn exporters(&self, want: &ServiceRef, state: Serving, dir: &impl Directory) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .live
            .iter()
            .filter(|(_, l)| {
                dir.services(&l.module, l.generation)
                    .is_some_and(|(exports, _)| exports.contains(want))
            })
            .filter(|(&pid, l)| dir.serving(pid, l) == state)
            .map(|(&pid, _)| pid)
            .collect();
        v.sort_unstable();
        v
    }

    /// The registered instances that import `offer` (name and version)
    /// and have not been told to stop, by pid.
    fn importers(&self, offer: &ServiceRef, dir: &impl Directory) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .live
            .iter()
            .filter(|(_, l)| {
                dir.services(&l.module, l.generation)
                    .is_some_and(|(_, imports)| imports.contains(offer))
            })
            .filter(|(&pid, l)| dir.serving(pid, l) != Serving::No)
            .map(|(&pid, _)| pid)
            .collect();
        v.sort_unstable();
        v
    }

    /// What `importer` imports under the name `service`.
    fn import_of(&self, importer: i32, service: &str, dir: &impl Directory) -> Option<ServiceRef> {
        let l = self.live.get(&importer)?;
        let (_, imports) = dir.services(&l.module, l.generation)?;
        imports.iter().find(|i| i.name == service).cloned()
    }

    /// Whether `importer`'s `service` has a channel to an exporter that is
    /// ready, other than those in `except`.
    fn served(&self, importer: i32, service: &str, except: &[i32], dir: &impl Directory) -> bool {
        self.exporters_of(importer, service).iter().any(|e| {
            !except.contains(e)
                && self
                    .live
                    .get(e)
                    .is_some_and(|l| dir.serving(*e, l) == Serving::Ready)
        })
    }

    fn record(&mut self, importer: i32, service: &str, exporter: i32) {
        let set = self
            .wired
            .entry((importer, service.to_owned()))
            .or_default();
        if !set.contains(&exporter) {
            set.push(exporter);
        }
    }

    /// Registers a worker about to be launched and returns the service ends
    /// for its launch order: for each service it imports, a channel to
    /// every ready exporter instance of that name and version (else to
    /// every starting one), whose ends are attached to them; for each
    /// service it exports, a channel to every importer instance that has
    /// no ready exporter yet. Importers already served get a channel to it
    /// once it is ready ([`Registry::exporter_ready`]).
    pub fn register(&mut self, pid: i32, me: Live, dir: &impl Directory) -> Vec<ServiceGrant> {
        let Some((exports, imports)) = dir.services(&me.module, me.generation) else {
            return Vec::new();
        };
        let (exports, imports) = (exports.to_vec(), imports.to_vec());
        let mut grants = Vec::new();
        for want in &imports {
            let mut to = self.exporters(want, Serving::Ready, dir);
            if to.is_empty() {
                to = self.exporters(want, Serving::Starting, dir);
            }
            to.retain(|e| *e != pid);
            if to.is_empty() {
                tracing::info!(
                    module = me.module,
                    replica = me.replica,
                    service = %want,
                    "import waits for its exporter"
                );
            }
            for epid in to {
                match wire(&want.name, &self.live[&epid].commands, GrantKind::Export) {
                    Ok(g) => {
                        grants.push(g);
                        self.record(pid, &want.name, epid);
                    }
                    Err(reason) => {
                        tracing::warn!(module = me.module, service = %want, %reason, "cannot wire import")
                    }
                }
            }
        }
        for offer in &exports {
            for ipid in self.importers(offer, dir) {
                if ipid == pid || self.served(ipid, &offer.name, &[], dir) {
                    continue;
                }
                let tx = &self.live[&ipid].commands;
                match wire(&offer.name, tx, GrantKind::Import) {
                    Ok(g) => {
                        grants.push(g);
                        tracing::info!(importer = self.live[&ipid].module, service = %offer, exporter = %me.module, "import wired");
                        self.record(ipid, &offer.name, pid);
                    }
                    Err(reason) => tracing::warn!(service = %offer, %reason, "cannot wire import"),
                }
            }
        }
        self.live.insert(pid, me);
        grants
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
                    "import wired"
                );
                self.record(importer, service, exporter);
            }
            Err(reason) => tracing::warn!(service, %reason, "cannot wire import"),
        }
    }

    /// Importers of `service` (at its version) that have no ready exporter
    /// apart from `except` get a channel to every ready exporter instance
    /// they lack, apart from `except`.
    fn rescue(&mut self, orphans: Vec<(i32, String)>, except: &[i32], dir: &impl Directory) {
        for (importer, service) in orphans {
            if self.served(importer, &service, except, dir) {
                continue;
            }
            let Some(want) = self.import_of(importer, &service, dir) else {
                continue;
            };
            for e in self.exporters(&want, Serving::Ready, dir) {
                if !except.contains(&e) && !self.exporters_of(importer, &service).contains(&e) {
                    self.rewire(importer, &service, e);
                }
            }
        }
    }

    /// An exporter instance became ready: every importer instance of its
    /// services (same name and version) that has no channel to it gets one.
    pub fn exporter_ready(&mut self, pid: i32, dir: &impl Directory) {
        let Some(me) = self.live.get(&pid) else {
            return;
        };
        let Some((exports, _)) = dir.services(&me.module, me.generation) else {
            return;
        };
        for offer in exports.iter().cloned() {
            for importer in self.importers(&offer, dir) {
                if importer != pid && !self.exporters_of(importer, &offer.name).contains(&pid) {
                    self.rewire(importer, &offer.name, pid);
                }
            }
        }
    }

    /// Exporter instances in `stopping` are about to be asked to stop (they
    /// drain, and the importers' clients leave them for a channel that
    /// serves): importers left with no other ready exporter get a channel
    /// to every ready one they lack (if there is none, they keep the old
    /// channels, which drain).
    pub fn exporters_stopping(&mut self, stopping: &[i32], dir: &impl Directory) {
        let orphans: Vec<(i32, String)> = self
            .wired
            .iter()
            .filter(|(_, set)| set.iter().any(|e| stopping.contains(e)))
            .map(|((i, s), _)| (*i, s.clone()))
            .collect();
        self.rescue(orphans, stopping, dir);
    }

    /// Forgets an exited worker: the imports it had wired, and its channels
    /// to importers (un-wired: `Status` no longer counts them). Importers
    /// left with no ready exporter get a channel to every ready one; with
    /// none they wait, and are wired when an exporter registers or becomes
    /// ready.
    pub fn unregister(&mut self, pid: i32, dir: &impl Directory) -> Option<Live> {
        let gone = self.live.remove(&pid);
        self.wired.retain(|(i, _), _| *i != pid);
        let mut orphans = Vec::new();
        for ((importer, service), set) in &mut self.wired {
            if let Some(at) = set.iter().position(|e| *e == pid) {
                set.remove(at);
                orphans.push((*importer, service.clone()));
            }
        }
        self.wired.retain(|_, set| !set.is_empty());
        orphans.sort_unstable();
        self.rescue(orphans, &[pid], dir);
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
    use tokio::sync::mpsc;

    /// Modules by (name, generation): exports, imports; per-pid serving
    /// state.
    #[derive(Default)]
    struct Fake {
        runs: HashMap<(String, u64), (Vec<ServiceRef>, Vec<ServiceRef>)>,
        serving: HashMap<i32, Serving>,
    }

    impl Directory for Fake {
        fn services(
            &self,
            module: &str,
            generation: u64,
        ) -> Option<(&[ServiceRef], &[ServiceRef])> {
            self.runs
                .get(&(module.to_owned(), generation))
                .map(|(e, i)| (e.as_slice(), i.as_slice()))
        }
        fn serving(&self, pid: i32, _: &Live) -> Serving {
            self.serving.get(&pid).copied().unwrap_or(Serving::No)
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

    fn kv(v: u32) -> Vec<ServiceRef> {
        vec![ServiceRef::new("kv", v)]
    }

    /// kv generations 1 and 2 export kv version 1, generation 3 version 2;
    /// greeter imports kv version 1, greeter2 version 2; hello neither.
    fn world() -> Fake {
        let mut f = Fake::default();
        f.runs.insert(("kv".into(), 1), (kv(1), Vec::new()));
        f.runs.insert(("kv".into(), 2), (kv(1), Vec::new()));
        f.runs.insert(("kv".into(), 3), (kv(2), Vec::new()));
        f.runs.insert(("greeter".into(), 5), (Vec::new(), kv(1)));
        f.runs.insert(("greeter2".into(), 6), (Vec::new(), kv(2)));
        f.runs.insert(("hello".into(), 7), (Vec::new(), Vec::new()));
        f
    }

    /// Registers `module` (generation `gen`) as `pid` in state `state`.
    fn add(
        r: &mut Registry,
        dir: &mut Fake,
        pid: i32,
        module: &str,
        gen: u64,
        state: Serving,
    ) -> (Vec<ServiceGrant>, Inbox) {
        let (l, rx) = live(module, gen);
        let grants = r.register(pid, l, dir);
        dir.serving.insert(pid, state);
        (grants, rx)
    }

    #[test]
    fn an_importer_gets_a_channel_to_every_ready_replica_and_nobody_else_an_end() {
        let mut dir = world();
        let mut r = Registry::default();
        let (_, mut kv_a) = add(&mut r, &mut dir, 100, "kv", 1, Serving::Ready);
        let (_, mut kv_b) = add(&mut r, &mut dir, 101, "kv", 1, Serving::Ready);
        let (_, mut hello) = add(&mut r, &mut dir, 300, "hello", 7, Serving::Ready);
        let (grants, _g) = add(&mut r, &mut dir, 200, "greeter", 5, Serving::Ready);
        assert_eq!(grants.len(), 2);
        assert!(grants
            .iter()
            .all(|g| g.grant.kind == GrantKind::Import && g.fds.len() == 2));
        for rx in [&mut kv_a, &mut kv_b] {
            assert_eq!(attached(rx), [(GrantKind::Export, "kv".into(), 2)]);
        }
        assert_eq!(r.exporters_of(200, "kv"), [100, 101]);
        // hello neither imports nor exports kv: it gets nothing.
        assert!(attached(&mut hello).is_empty());
    }

    #[test]
    fn a_starting_replica_gets_the_served_importers_once_ready() {
        let mut dir = world();
        let mut r = Registry::default();
        let (_, _kv_a) = add(&mut r, &mut dir, 100, "kv", 1, Serving::Ready);
        let (_, mut g) = add(&mut r, &mut dir, 200, "greeter", 5, Serving::Ready);
        let (grants, mut kv_b) = add(&mut r, &mut dir, 101, "kv", 1, Serving::Starting);
        assert!(
            grants.is_empty(),
            "greeter is served: no channel to a starting replica"
        );
        assert!(attached(&mut g).is_empty());
        dir.serving.insert(101, Serving::Ready);
        r.exporter_ready(101, &dir);
        assert_eq!(r.exporters_of(200, "kv"), [100, 101]);
        // The exporter's end first, so the importer's first call is served.
        assert_eq!(attached(&mut kv_b), [(GrantKind::Export, "kv".into(), 2)]);
        assert_eq!(attached(&mut g), [(GrantKind::Import, "kv".into(), 2)]);
        // Ready again (a second report) wires nothing twice.
        r.exporter_ready(101, &dir);
        assert!(attached(&mut g).is_empty());
    }

    #[test]
    fn without_a_ready_exporter_an_importer_is_wired_to_the_starting_ones() {
        let mut dir = world();
        let mut r = Registry::default();
        let (_, mut kv_a) = add(&mut r, &mut dir, 100, "kv", 1, Serving::Starting);
        let (grants, _g) = add(&mut r, &mut dir, 200, "greeter", 5, Serving::Starting);
        assert_eq!(grants.len(), 1);
        assert_eq!(attached(&mut kv_a).len(), 1);
        // And an exporter launched for a waiting importer brings its end.
        let mut r = Registry::default();
        let (grants, _g) = add(&mut r, &mut dir, 200, "greeter", 5, Serving::Ready);
        assert!(grants.is_empty());
        let (grants, _kv) = add(&mut r, &mut dir, 100, "kv", 1, Serving::Starting);
        assert_eq!(grants.len(), 1);
        assert_eq!(grants[0].grant.kind, GrantKind::Export);
        assert_eq!(r.exporters_of(200, "kv"), [100]);
    }

    #[test]
    fn a_release_adds_the_new_revision_and_its_exit_unwires_the_old() {
        let mut dir = world();
        let mut r = Registry::default();
        let (_, mut kv1) = add(&mut r, &mut dir, 100, "kv", 1, Serving::Ready);
        let (_, mut g) = add(&mut r, &mut dir, 200, "greeter", 5, Serving::Ready);
        attached(&mut kv1);
        let (grants, _kv2) = add(&mut r, &mut dir, 101, "kv", 2, Serving::Starting);
        assert!(grants.is_empty());
        dir.serving.insert(101, Serving::Ready);
        r.exporter_ready(101, &dir);
        assert_eq!(attached(&mut g).len(), 1);
        // The old one is asked to stop: greeter is served by the new one,
        // so nothing is wired; the old one drains and exits.
        dir.serving.insert(100, Serving::No);
        r.exporters_stopping(&[100], &dir);
        assert!(attached(&mut g).is_empty());
        assert!(r.unregister(100, &dir).is_some());
        assert_eq!(r.exporters_of(200, "kv"), [101]);
        assert!(attached(&mut kv1).is_empty());
    }

    #[test]
    fn an_exporter_that_dies_is_unwired_and_its_replacement_wired_at_launch() {
        let mut dir = world();
        let mut r = Registry::default();
        let (_, _kv) = add(&mut r, &mut dir, 100, "kv", 1, Serving::Ready);
        let (_, mut g) = add(&mut r, &mut dir, 200, "greeter", 5, Serving::Ready);
        dir.serving.insert(100, Serving::No);
        r.unregister(100, &dir);
        assert_eq!(r.exporters_of(200, "kv"), [0; 0]);
        assert!(attached(&mut g).is_empty());
        let (grants, _kv) = add(&mut r, &mut dir, 102, "kv", 1, Serving::Starting);
        assert_eq!(grants.len(), 1);
        assert_eq!(attached(&mut g), [(GrantKind::Import, "kv".into(), 2)]);
        assert_eq!(r.exporters_of(200, "kv"), [102]);
    }

    #[test]
    fn importers_left_without_a_ready_exporter_are_wired_to_the_others() {
        let mut dir = world();
        let mut r = Registry::default();
        let (_, _kv_a) = add(&mut r, &mut dir, 100, "kv", 1, Serving::Ready);
        let (_, mut g) = add(&mut r, &mut dir, 200, "greeter", 5, Serving::Ready);
        // A replica that got ready without the registry hearing of it.
        let (_, _kv_b) = add(&mut r, &mut dir, 101, "kv", 1, Serving::Ready);
        assert_eq!(r.exporters_of(200, "kv"), [100]);
        dir.serving.insert(100, Serving::No);
        r.exporters_stopping(&[100], &dir);
        assert_eq!(attached(&mut g).len(), 1);
        assert_eq!(r.exporters_of(200, "kv"), [100, 101]);
    }

    #[test]
    fn an_import_is_wired_only_to_an_export_of_its_version() {
        let mut dir = world();
        let mut r = Registry::default();
        let (_, mut kv1) = add(&mut r, &mut dir, 100, "kv", 1, Serving::Ready);
        let (grants, _g) = add(&mut r, &mut dir, 200, "greeter2", 6, Serving::Ready);
        assert!(grants.is_empty(), "kv version 1 does not serve version 2");
        assert!(attached(&mut kv1).is_empty());
        r.exporter_ready(100, &dir);
        assert_eq!(r.exporters_of(200, "kv"), [0; 0]);
        let (grants, _kv3) = add(&mut r, &mut dir, 101, "kv", 3, Serving::Starting);
        assert_eq!(grants.len(), 1);
        assert_eq!(r.exporters_of(200, "kv"), [101]);
    }

    #[test]
    fn stale_runs_are_neither_wired_nor_picked() {
        let mut dir = world();
        let mut r = Registry::default();
        let (grants, _) = add(&mut r, &mut dir, 100, "kv", 9, Serving::Ready);
        assert!(grants.is_empty());
        let (grants, _) = add(&mut r, &mut dir, 200, "greeter", 5, Serving::Ready);
        assert!(grants.is_empty());
        assert_eq!(r.exporters_of(200, "kv"), [0; 0]);
    }
}
