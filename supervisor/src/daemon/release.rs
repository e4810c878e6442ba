//! The rollout planner: how many replicas of the old and the new revision
//! should run at each moment of a release. A pure function of counts, so
//! the whole state machine is tested without processes; the actor applies
//! its answer to the lifecycles (`Run::reconcile`).
//!
//! ```text
//!             new replica fails to start ─────────────▶ Aborted
//!                  ▲            ▲                          ▲
//! Progressing ─(pause_after ready)─▶ Paused ─resume─┐     │ abort
//!      │  ▲                                          │     │
//!      │  └──────────────────────────────────────────┘     │
//!      └─(all new ready)─▶ Draining ─(old exited)─▶ Stabilizing ─(stable_after)─▶ Completed
//!                                                       │
//!                                              new crashes ─▶ RollingBack (a rollout back)
//! ```
//!
//! The parameters mirror a Kubernetes Deployment's strategy: `maxSurge`,
//! `maxUnavailable`, `paused`.

use std::time::Duration;

use module_runtime::manifest::Strategy;
use serde::Serialize;

/// A rollout's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// The module's replica count (the new revision's).
    pub replicas: u32,
    /// Surge or rolling.
    pub strategy: Strategy,
    /// Replicas that may run above `replicas`.
    pub max_surge: u32,
    /// Replicas that may be missing below `replicas`.
    pub max_unavailable: u32,
    /// Pause once this many new replicas are ready (a canary).
    pub pause_after: Option<u32>,
    /// How long the new revision must run without a crash once it has
    /// taken over.
    pub stable_after: Duration,
}

impl Params {
    /// The manifest's rollout section with the caller's overrides; the
    /// defaults are those of the strategy (surge: `max_surge = replicas`,
    /// rolling: 1; `max_unavailable` 0).
    pub fn resolve(
        replicas: u32,
        manifest: &module_runtime::manifest::Rollout,
        overrides: &Overrides,
    ) -> Result<Self, String> {
        let strategy = overrides.strategy.unwrap_or(manifest.strategy);
        let default_surge = match strategy {
            Strategy::Surge => replicas,
            Strategy::Rolling => 1,
        };
        let max_surge = overrides
            .max_surge
            .or(manifest.max_surge)
            .unwrap_or(default_surge);
        let max_unavailable = overrides
            .max_unavailable
            .or(manifest.max_unavailable)
            .unwrap_or(0)
            .min(replicas);
        if max_surge == 0 && max_unavailable == 0 {
            return Err(
                "max_surge and max_unavailable cannot both be 0: the rollout could not move".into(),
            );
        }
        if strategy == Strategy::Surge && max_surge < replicas {
            return Err(format!(
                "max_surge {max_surge}: a surge starts all {replicas} new replicas beside the old \
                 ones; use the rolling strategy for fewer at a time"
            ));
        }
        if max_surge > module_runtime::manifest::MAX_REPLICAS {
            return Err(format!(
                "max_surge {max_surge} is more than {}",
                module_runtime::manifest::MAX_REPLICAS
            ));
        }
        if let Some(n) = overrides.pause_after {
            if n == 0 || n > replicas {
                return Err(format!(
                    "pause_after must be between 1 and the module's {replicas} replicas"
                ));
            }
        }
        Ok(Self {
            replicas,
            strategy,
            max_surge,
            max_unavailable,
            pause_after: overrides.pause_after,
            stable_after: manifest.stable_after,
        })
    }
}

/// What a caller of `Deploy` may set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--strategy`.
    pub strategy: Option<Strategy>,
    /// `--max-surge`.
    pub max_surge: Option<u32>,
    /// `--max-unavailable`.
    pub max_unavailable: Option<u32>,
    /// `--pause-after`.
    pub pause_after: Option<u32>,
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Phase {
    /// New replicas starting (and, rolling, old ones stopping in batches).
    #[serde(rename = "progressing")]
    Progressing,
    /// Held: after `pause_after` new replicas are ready, or by request.
    #[serde(rename = "paused")]
    Paused,
    /// Every new replica is ready; the old ones drain and exit.
    #[serde(rename = "draining")]
    Draining,
    /// Only the new revision runs; committed after `stable_after`.
    #[serde(rename = "stabilizing")]
    Stabilizing,
    /// The new revision failed after taking over; the previous one is
    /// being started again.
    #[serde(rename = "rolling-back")]
    RollingBack,
}

impl Phase {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Progressing => "progressing",
            Phase::Paused => "paused",
            Phase::Draining => "draining",
            Phase::Stabilizing => "stabilizing",
            Phase::RollingBack => "rolling-back",
        }
    }
}

/// Replica counts of the two revisions, as the lifecycles are now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Old replicas not stopped (starting, running, stopping, backing off).
    pub old_alive: u32,
    /// Old replicas ready.
    pub old_ready: u32,
    /// How many old replicas are wanted now (the plan's last answer).
    pub old_target: u32,
    /// How many new replicas are wanted now.
    pub new_target: u32,
    /// New replicas ready.
    pub new_ready: u32,
    /// A new replica failed (crashed, missed its start deadline, cannot
    /// start): why.
    pub new_failure: bool,
}

/// What the plan wants next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Keep `old` old replicas and `new` new ones running (replicas
    /// `0..n` of each revision run; the rest are stopped).
    Scale {
        /// Old replicas wanted.
        old: u32,
        /// New replicas wanted.
        new: u32,
        /// The phase this puts the rollout in.
        phase: Phase,
    },
    /// A new replica failed before the new revision took over: stop every
    /// new replica and run every old one again.
    Abort,
    /// Only the new revision runs, all ready: the takeover is done.
    TookOver,
}

/// The next step of a rollout that has not taken over yet. `paused`: held
/// by request or by `pause_after` (the caller keeps that flag and clears it
/// on resume).
pub fn plan(p: &Params, c: &Counts, paused: bool) -> Step {
    let n = p.replicas;
    if c.new_failure {
        return Step::Abort;
    }
    if c.new_ready >= n && c.new_target >= n && c.old_alive == 0 {
        return Step::TookOver;
    }
    if paused {
        return Step::Scale {
            old: c.old_target,
            new: c.new_target,
            phase: Phase::Paused,
        };
    }
    // Never more new replicas than the canary allows before a resume.
    let cap = p.pause_after.unwrap_or(n).min(n);
    match p.strategy {
        Strategy::Surge => {
            // Every new replica beside the old ones (however many old ones
            // there are: a deploy may change the count); the old ones drain
            // only once all the new ones are ready.
            let new = c.new_target.max(cap);
            if c.new_ready >= n {
                Step::Scale {
                    old: 0,
                    new,
                    phase: Phase::Draining,
                }
            } else {
                Step::Scale {
                    old: c.old_target,
                    new,
                    phase: Phase::Progressing,
                }
            }
        }
        Strategy::Rolling => {
            // Kubernetes' rule: old replicas that are not ready go first
            // (stopping them costs no availability; a release is often the
            // fix for a crash-looping module), then the new revision scales
            // up within n + max_surge replicas alive and the old one down
            // while at least n - max_unavailable stay ready.
            let unready = c.old_target.saturating_sub(c.old_ready);
            // The unready ones are asked to stop in this very step.
            let alive = c.old_alive.saturating_sub(unready);
            let room = (n + p.max_surge).saturating_sub(alive);
            let new = c.new_target.max(room.min(cap));
            let available = c.old_ready + c.new_ready;
            let floor = n.saturating_sub(p.max_unavailable);
            let surplus = available.saturating_sub(floor);
            let old = c.old_target.saturating_sub(unready).saturating_sub(surplus);
            let phase = if c.new_ready >= n {
                Phase::Draining
            } else {
                Phase::Progressing
            };
            Step::Scale { old, new, phase }
        }
    }
}

/// Whether a rollout that is not paused by request should pause now: its
/// canary (`pause_after` new replicas) is ready.
pub fn canary_done(p: &Params, c: &Counts) -> bool {
    p.pause_after
        .is_some_and(|k| k < p.replicas && c.new_ready >= k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(strategy: Strategy, n: u32, surge: u32, unavailable: u32) -> Params {
        Params {
            replicas: n,
            strategy,
            max_surge: surge,
            max_unavailable: unavailable,
            pause_after: None,
            stable_after: Duration::from_secs(1),
        }
    }

    /// Drives a plan against an ideal world where every wanted replica
    /// becomes ready and every unwanted one exits at once, one step at a
    /// time; returns the (old alive, new alive) pairs seen.
    fn simulate(p: &Params, paused_at_canary: bool) -> (Vec<(u32, u32)>, Step) {
        let n = p.replicas;
        let mut c = Counts {
            old_alive: n,
            old_ready: n,
            old_target: n,
            ..Default::default()
        };
        let mut seen = Vec::new();
        for _ in 0..100 {
            let paused = paused_at_canary && canary_done(p, &c);
            match plan(p, &c, paused) {
                Step::Scale { old, new, phase } => {
                    // Ready new replicas first, then the old ones go: each
                    // step is one state the world passes through.
                    c.old_target = old;
                    c.new_target = new;
                    c.new_ready = new;
                    seen.push((c.old_alive, c.new_ready));
                    c.old_alive = old;
                    c.old_ready = old;
                    seen.push((c.old_alive, c.new_ready));
                    if phase == Phase::Paused {
                        return (seen, Step::Scale { old, new, phase });
                    }
                }
                s => return (seen, s),
            }
        }
        panic!("the rollout did not finish: {seen:?}");
    }

    #[test]
    fn surge_starts_every_new_replica_then_drains_the_old_ones() {
        let p = params(Strategy::Surge, 8, 8, 0);
        let c = Counts {
            old_alive: 8,
            old_ready: 8,
            old_target: 8,
            ..Default::default()
        };
        assert_eq!(
            plan(&p, &c, false),
            Step::Scale {
                old: 8,
                new: 8,
                phase: Phase::Progressing
            }
        );
        // Seven of eight ready: the old ones are not touched yet.
        let c7 = Counts {
            new_target: 8,
            new_ready: 7,
            ..c
        };
        assert_eq!(
            plan(&p, &c7, false),
            Step::Scale {
                old: 8,
                new: 8,
                phase: Phase::Progressing
            }
        );
        let c8 = Counts { new_ready: 8, ..c7 };
        assert_eq!(
            plan(&p, &c8, false),
            Step::Scale {
                old: 0,
                new: 8,
                phase: Phase::Draining
            }
        );
        let done = Counts {
            old_alive: 0,
            old_ready: 0,
            old_target: 0,
            ..c8
        };
        assert_eq!(plan(&p, &done, false), Step::TookOver);
        let (seen, end) = simulate(&p, false);
        assert_eq!(end, Step::TookOver);
        // Never fewer than 8 ready.
        assert!(seen.iter().all(|(o, n)| o + n >= 8), "{seen:?}");
    }

    #[test]
    fn rolling_respects_surge_and_unavailability_bounds() {
        for (surge, unavailable) in [(1, 0), (0, 1), (2, 1), (3, 0), (0, 3)] {
            let p = params(Strategy::Rolling, 8, surge, unavailable);
            let (seen, end) = simulate(&p, false);
            assert_eq!(
                end,
                Step::TookOver,
                "surge {surge} unavailable {unavailable}"
            );
            for (old, new) in &seen {
                assert!(old + new <= 8 + surge, "{surge}/{unavailable}: {seen:?}");
                assert!(
                    old + new >= 8 - unavailable,
                    "{surge}/{unavailable}: {seen:?}"
                );
            }
        }
    }

    #[test]
    fn a_deploy_may_change_the_replica_count() {
        // 3 old replicas, 1 new: the surge starts the one and drains the 3.
        let p = params(Strategy::Surge, 1, 1, 0);
        let c = Counts {
            old_alive: 3,
            old_ready: 3,
            old_target: 3,
            ..Default::default()
        };
        assert_eq!(
            plan(&p, &c, false),
            Step::Scale {
                old: 3,
                new: 1,
                phase: Phase::Progressing
            }
        );
        let c = Counts {
            new_target: 1,
            new_ready: 1,
            ..c
        };
        assert_eq!(
            plan(&p, &c, false),
            Step::Scale {
                old: 0,
                new: 1,
                phase: Phase::Draining
            }
        );
        // Rolling, 3 → 2 and 2 → 5: it finishes.
        for (old, new) in [(3, 2), (2, 5)] {
            let p = params(Strategy::Rolling, new, 1, 0);
            let mut c = Counts {
                old_alive: old,
                old_ready: old,
                old_target: old,
                ..Default::default()
            };
            let mut done = false;
            for _ in 0..50 {
                match plan(&p, &c, false) {
                    Step::Scale { old, new, .. } => {
                        c.old_target = old;
                        c.old_alive = old;
                        c.old_ready = old;
                        c.new_target = new;
                        c.new_ready = new;
                    }
                    Step::TookOver => {
                        done = true;
                        break;
                    }
                    Step::Abort => panic!("abort"),
                }
            }
            assert!(done, "{old} -> {new} stuck at {c:?}");
        }
    }

    #[test]
    fn rolling_stops_old_replicas_that_are_not_ready_first() {
        // Two old replicas that never become ready: they go, the new ones
        // come, without waiting for availability that never comes.
        let p = params(Strategy::Rolling, 2, 1, 0);
        let mut c = Counts {
            old_alive: 2,
            old_ready: 0,
            old_target: 2,
            ..Default::default()
        };
        let mut seen = Vec::new();
        for _ in 0..20 {
            match plan(&p, &c, false) {
                Step::Scale { old, new, .. } => {
                    seen.push((old, new));
                    c.old_target = old;
                    c.old_alive = old;
                    c.new_target = new;
                    c.new_ready = new;
                }
                Step::TookOver => break,
                Step::Abort => panic!("abort"),
            }
        }
        assert_eq!(plan(&p, &c, false), Step::TookOver, "{seen:?}");
        assert_eq!(seen[0].0, 0, "unready old replicas stop first: {seen:?}");
    }

    #[test]
    fn a_failed_new_replica_aborts_at_any_phase() {
        for strategy in [Strategy::Surge, Strategy::Rolling] {
            let p = params(strategy, 4, 1, 0);
            let c = Counts {
                old_alive: 4,
                old_ready: 4,
                old_target: 4,
                new_target: 1,
                new_failure: true,
                ..Default::default()
            };
            assert_eq!(plan(&p, &c, false), Step::Abort);
            assert_eq!(plan(&p, &c, true), Step::Abort);
        }
    }

    #[test]
    fn pause_after_holds_a_canary_until_resumed() {
        let mut p = params(Strategy::Surge, 8, 8, 0);
        p.pause_after = Some(2);
        let (seen, end) = simulate(&p, true);
        assert_eq!(
            end,
            Step::Scale {
                old: 8,
                new: 2,
                phase: Phase::Paused
            }
        );
        // The old replicas were never touched.
        assert!(seen.iter().all(|(o, _)| *o == 8), "{seen:?}");
        // Resumed: the cap is lifted by the caller (no more pause_after).
        p.pause_after = None;
        let c = Counts {
            old_alive: 8,
            old_ready: 8,
            old_target: 8,
            new_target: 2,
            new_ready: 2,
            new_failure: false,
        };
        assert_eq!(
            plan(&p, &c, false),
            Step::Scale {
                old: 8,
                new: 8,
                phase: Phase::Progressing
            }
        );
        // Paused by request: nothing moves.
        assert_eq!(
            plan(&p, &c, true),
            Step::Scale {
                old: 8,
                new: 2,
                phase: Phase::Paused
            }
        );
    }

    #[test]
    fn params_take_overrides_then_the_manifest_then_the_strategy_defaults() {
        let m = module_runtime::manifest::Rollout::default();
        let p = Params::resolve(8, &m, &Overrides::default()).unwrap();
        assert_eq!(
            (p.strategy, p.max_surge, p.max_unavailable),
            (Strategy::Surge, 8, 0)
        );
        let o = Overrides {
            strategy: Some(Strategy::Rolling),
            ..Default::default()
        };
        let p = Params::resolve(8, &m, &o).unwrap();
        assert_eq!((p.max_surge, p.max_unavailable), (1, 0));
        let o = Overrides {
            strategy: Some(Strategy::Rolling),
            max_surge: Some(0),
            ..Default::default()
        };
        assert!(Params::resolve(8, &m, &o)
            .unwrap_err()
            .contains("both be 0"));
        let o = Overrides {
            max_surge: Some(2),
            ..Default::default()
        };
        assert!(Params::resolve(8, &m, &o).unwrap_err().contains("rolling"));
        let o = Overrides {
            pause_after: Some(9),
            ..Default::default()
        };
        assert!(Params::resolve(8, &m, &o)
            .unwrap_err()
            .contains("pause_after"));
    }
}
