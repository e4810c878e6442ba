//! Replies rendered from the actor's model: `List` lines, `Status`,
//! `History`. Functions of the model (and, for status, of memory and CPU
//! readings), nothing else.

use std::collections::HashMap;

use super::model::{Module, Run};
use super::registry::Registry;
use crate::cgroup::Limiter;
use crate::control::history::Revision;
use crate::control::list::{ModuleSummary, RolloutSummary};
use crate::control::status::{
    ImportStatus, LimitsStatus, ListenerStatus, ModuleStatus, ReplicaStatus, SandboxStatus,
};
use crate::lifecycle::{Lifecycle, State};
use crate::manifest::ServiceRef;
use crate::metrics::{Memory, MemoryCache};
use crate::store::RevisionRecord;
use crate::worker::SandboxReport;

/// The committed revision number of a module.
pub(super) fn revision(m: &Module) -> u64 {
    m.active().revision
}

/// A rollout in progress, as replies show it.
pub(super) fn rollout(m: &Module) -> Option<RolloutSummary> {
    let r = m.rollout.as_ref()?;
    let old = m.run(r.from_gen);
    let new = m.run(r.to_gen);
    Some(RolloutSummary {
        revision: r.to_revision,
        from_revision: r.from_revision,
        version: r.version.clone(),
        strategy: r.params.strategy.as_str(),
        max_surge: r.params.max_surge,
        max_unavailable: r.params.max_unavailable,
        pause_after: r.params.pause_after,
        phase: r.phase.as_str(),
        old_replicas: old.map_or(0, Run::alive),
        new_replicas: new.map_or(0, Run::alive),
        new_ready: new.map_or(0, Run::ready),
        reason: r.reason.clone(),
        seconds: r.started.elapsed().as_secs_f64(),
    })
}

pub(super) fn summary(m: &Module) -> ModuleSummary {
    let run = m.active();
    let pids: Vec<i32> = m
        .runs
        .iter()
        .flat_map(|r| r.replicas.iter().filter_map(Lifecycle::pid))
        .collect();
    ModuleSummary {
        name: run.record.name.clone(),
        version: run.record.version.clone(),
        state: m.state(),
        pid: m.serving().replicas.iter().find_map(Lifecycle::pid),
        pids,
        replicas: m.serving().replicas.len() as u32,
        restarts: m
            .runs
            .iter()
            .flat_map(|r| r.replicas.iter().map(Lifecycle::restarts))
            .sum(),
        revision: revision(m),
        rollout: rollout(m),
    }
}

/// A replica as the model knows it; the readings from `/proc` and the
/// cgroups are added off the actor ([`read`], [`apply`]).
fn replica_status(
    run: &Run,
    r: usize,
    l: &Lifecycle,
    sandboxes: &HashMap<i32, SandboxReport>,
) -> ReplicaStatus {
    ReplicaStatus {
        replica: r as u32,
        revision: run.revision,
        state: l.state(),
        reason: l.reason().map(str::to_owned),
        pid: l.pid(),
        restarts: l.restarts(),
        last_error: l.last_error().map(str::to_owned),
        state_seconds: l.since().elapsed().as_secs_f64(),
        memory: None,
        cpu_seconds: None,
        cgroups: Vec::new(),
        sandbox: l
            .pid()
            .and_then(|p| sandboxes.get(&p))
            .map(|s| SandboxStatus::new(s, run.sandbox.is_some())),
    }
}

/// What the OS says of one worker.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Reading {
    memory: Option<Memory>,
    cpu_seconds: Option<f64>,
    cgroups: Vec<String>,
}

/// Reads memory, CPU and cgroup directories of every worker of `status`
/// (blocking: `/proc` and cgroupfs; run it off the actor).
pub(super) fn read(
    status: &ModuleStatus,
    limiter: &Limiter,
    memory: &MemoryCache,
) -> HashMap<i32, Reading> {
    status
        .replicas
        .iter()
        .filter_map(|r| Some((r, r.pid?)))
        .map(|(r, pid)| {
            let cgroups = limiter
                .instance_dirs(&status.name, r.replica, pid)
                .into_iter()
                .filter(|d| d.is_dir())
                .map(|d| d.display().to_string())
                .collect();
            let reading = Reading {
                // smaps_rollup walks the process's page tables under its
                // mmap lock, which would stall a module that is still
                // loading (dlopen, thread stacks) for milliseconds: only
                // running replicas are measured.
                memory: (r.state == State::Running)
                    .then(|| memory.memory(pid))
                    .flatten(),
                cpu_seconds: crate::metrics::cpu_seconds(pid).ok(),
                cgroups,
            };
            (pid, reading)
        })
        .collect()
}

/// `status` with the readings in: each replica's, and their sums.
pub(super) fn apply(mut status: ModuleStatus, readings: &HashMap<i32, Reading>) -> ModuleStatus {
    for r in &mut status.replicas {
        if let Some(x) = r.pid.and_then(|p| readings.get(&p)) {
            r.memory = x.memory;
            r.cpu_seconds = x.cpu_seconds;
            r.cgroups = x.cgroups.clone();
        }
    }
    status.memory = status
        .replicas
        .iter()
        .filter_map(|r| r.memory)
        .reduce(|a, b| Memory {
            rss: a.rss + b.rss,
            pss: a.pss + b.pss,
            uss: a.uss + b.uss,
        });
    let cpu: Vec<f64> = status
        .replicas
        .iter()
        .filter_map(|r| r.cpu_seconds)
        .collect();
    status.cpu_seconds = (!cpu.is_empty()).then(|| cpu.iter().sum());
    status
}

/// Why the import `want` is unmet: `None` if a running module exports it
/// at its version, else the versions running modules export under its
/// name (`counter exports version 1`), or that none does.
pub(super) fn unmet_import<'a>(
    want: &ServiceRef,
    modules: impl Iterator<Item = &'a Module>,
) -> Option<String> {
    let mut others: Vec<String> = Vec::new();
    for m in modules {
        for run in m
            .runs
            .iter()
            .filter(|r| r.replicas.iter().any(|l| l.state() == State::Running))
        {
            for e in run.exports.iter().filter(|e| e.name == want.name) {
                if e.version == want.version {
                    return None;
                }
                let other = format!("{} exports version {}", run.record.name, e.version);
                if !others.contains(&other) {
                    others.push(other);
                }
            }
        }
    }
    Some(if others.is_empty() {
        "no running module exports it".to_owned()
    } else {
        others.join(", ")
    })
}

/// Each import of the serving run: `wired` while every running replica
/// has a channel to an exporter instance that runs, else `waiting`, with
/// why.
pub(super) fn imports_status<'a>(
    m: &Module,
    modules: impl Iterator<Item = &'a Module> + Clone,
    registry: &Registry,
) -> Vec<ImportStatus> {
    let run = m.serving();
    let running: Vec<i32> = run
        .replicas
        .iter()
        .filter(|l| l.state() == State::Running)
        .filter_map(Lifecycle::pid)
        .collect();
    // A channel counts while its exporter instance runs: `pid` is the
    // current worker of a running replica (the registry forgets exited
    // workers).
    let exporter_runs = |pid: &i32| {
        registry.get(*pid).is_some_and(|l| {
            modules
                .clone()
                .filter_map(|e| e.run(l.generation))
                .filter(|e| e.record.name == l.module)
                .filter_map(|e| e.replicas.get(l.replica as usize))
                .any(|r| r.pid() == Some(*pid) && r.state() == State::Running)
        })
    };
    run.imports
        .iter()
        .map(|want| {
            let exporter = modules
                .clone()
                .find(|e| e.serving().exports.contains(want))
                .map(|e| e.active().record.name.clone());
            let wired = |p: &i32| {
                registry
                    .exporters_of(*p, &want.name)
                    .iter()
                    .any(exporter_runs)
            };
            let all_wired = !running.is_empty() && running.iter().all(wired);
            let reason = if all_wired {
                None
            } else {
                unmet_import(want, modules.clone()).or_else(|| {
                    Some(if running.is_empty() {
                        "no replica running".to_owned()
                    } else {
                        format!(
                            "{} of {} running replicas wired",
                            running.iter().filter(|p| wired(p)).count(),
                            running.len()
                        )
                    })
                })
            };
            ImportStatus {
                name: want.name.clone(),
                version: want.version,
                state: if all_wired { "wired" } else { "waiting" }.into(),
                exporter,
                reason,
            }
        })
        .collect()
}

/// A module's status from the model alone (no memory or CPU yet: see
/// [`read`] and [`apply`]).
pub(super) fn status(
    m: &Module,
    imports: Vec<ImportStatus>,
    limiter: &Limiter,
    sandboxes: &HashMap<i32, SandboxReport>,
) -> ModuleStatus {
    let run = m.serving();
    // The serving run's replicas, then the other runs' (a rollout's).
    let mut runs: Vec<&Run> = vec![run];
    runs.extend(m.runs.iter().filter(|r| r.generation != run.generation));
    let replicas: Vec<ReplicaStatus> = runs
        .iter()
        .flat_map(|run| {
            run.replicas
                .iter()
                .enumerate()
                .map(move |(r, l)| replica_status(run, r, l, sandboxes))
        })
        .collect();
    let own: Vec<&ReplicaStatus> = replicas
        .iter()
        .filter(|r| r.revision == run.revision)
        .collect();
    let many = own.len() > 1;
    // Module-level fields: the first replica that has one (prefixed with its
    // number when there are several), sums for counters.
    let first = |f: fn(&ReplicaStatus) -> Option<&String>| {
        own.iter().find_map(|r| {
            f(r).map(|s| {
                if many {
                    format!("replica {}: {s}", r.replica)
                } else {
                    s.clone()
                }
            })
        })
    };
    let active = m.active();
    ModuleStatus {
        name: active.record.name.clone(),
        version: active.record.version.clone(),
        state: m.state(),
        reason: first(|r| r.reason.as_ref()),
        pid: own.iter().find_map(|r| r.pid),
        restarts: replicas.iter().map(|r| r.restarts).sum(),
        last_error: first(|r| r.last_error.as_ref()),
        artifact_sha256: active.record.artifact_sha256.clone(),
        listeners: run
            .listener_addrs
            .iter()
            .map(|(name, address)| ListenerStatus {
                name: name.clone(),
                address: address.clone(),
            })
            .collect(),
        state_seconds: own
            .iter()
            .map(|r| r.state_seconds)
            .fold(f64::INFINITY, f64::min)
            .min(f64::MAX),
        memory: None,
        cpu_seconds: None,
        imports,
        limits: LimitsStatus::new(run.limits, run.limit_sources, limiter.detection()),
        replicas,
        revision: revision(m),
        rollout: rollout(m),
    }
}

/// `History`'s entries, newest first.
pub(super) fn history(revisions: &[RevisionRecord]) -> Vec<Revision> {
    revisions
        .iter()
        .map(|r| Revision {
            revision: r.revision,
            version: r.version.clone(),
            artifact_sha256: r.artifact_sha256.clone(),
            deployed_at: rfc3339(r.deployed_at),
            outcome: r.outcome.as_str(),
            reason: r.reason.clone(),
        })
        .collect()
}

/// `2026-12-05T16:00:00Z`.
pub(super) fn rfc3339(unix_seconds: u64) -> String {
    let line = super::os::format_line(
        std::time::Duration::from_secs(unix_seconds),
        "",
        None,
        "",
        "",
    );
    // format_line gives `YYYY-MM-DDTHH:MM:SS.mmmZ  : \n`.
    format!("{}Z", &line[..19])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Outcome;

    #[test]
    fn readings_fill_replicas_and_sum_over_them() {
        let replica = |n: u32, pid: Option<i32>| ReplicaStatus {
            replica: n,
            revision: 1,
            state: State::Running,
            reason: None,
            pid,
            restarts: 0,
            last_error: None,
            state_seconds: 0.0,
            memory: None,
            cpu_seconds: None,
            cgroups: Vec::new(),
            sandbox: None,
        };
        let status = ModuleStatus {
            name: "m".into(),
            version: "1.0.0".into(),
            state: State::Running,
            reason: None,
            pid: Some(10),
            restarts: 0,
            last_error: None,
            artifact_sha256: String::new(),
            listeners: Vec::new(),
            state_seconds: 0.0,
            memory: None,
            cpu_seconds: None,
            imports: Vec::new(),
            limits: LimitsStatus::new(
                crate::cgroup::Limits::default(),
                Default::default(),
                &Default::default(),
            ),
            replicas: vec![replica(0, Some(10)), replica(1, Some(11)), replica(2, None)],
            revision: 1,
            rollout: None,
        };
        let mem = |k| Memory {
            rss: k,
            pss: k,
            uss: k,
        };
        let readings = HashMap::from([
            (
                10,
                Reading {
                    memory: Some(mem(1)),
                    cpu_seconds: Some(0.5),
                    cgroups: vec!["/sys/fs/cgroup/x".into()],
                },
            ),
            (
                11,
                Reading {
                    memory: Some(mem(2)),
                    cpu_seconds: Some(0.25),
                    cgroups: Vec::new(),
                },
            ),
        ]);
        let s = apply(status, &readings);
        assert_eq!(s.memory, Some(mem(3)));
        assert_eq!(s.cpu_seconds, Some(0.75));
        assert_eq!(s.replicas[0].cgroups, ["/sys/fs/cgroup/x"]);
        assert_eq!(s.replicas[2].memory, None);
        let none = apply(s.clone(), &HashMap::new());
        assert_eq!(
            none.memory,
            Some(mem(3)),
            "readings are kept where none is new"
        );
    }

    #[test]
    fn history_is_rendered_newest_first_with_utc_times() {
        let r = |n, outcome, reason: Option<&str>| RevisionRecord {
            revision: n,
            version: format!("0.{n}.0"),
            artifact_sha256: "ab".repeat(32),
            manifest: String::new(),
            source: "/m".into(),
            deployed_at: 1_795_826_986,
            outcome,
            reason: reason.map(str::to_owned),
        };
        let h = history(&[
            r(
                3,
                Outcome::RolledBack,
                Some("replica 0: worker killed by signal 11"),
            ),
            r(2, Outcome::Active, None),
        ]);
        assert_eq!(h[0].revision, 3);
        assert_eq!(h[0].outcome, "rolled-back");
        assert_eq!(h[0].deployed_at, "2026-11-28T00:49:46Z");
        assert!(h[0].reason.as_deref().unwrap().contains("signal 11"));
        assert_eq!(h[1].outcome, "active");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
