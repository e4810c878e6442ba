//! The zygote's messages, in the same frames as the worker's
//! ([`super::codec`]) on the same transport: supervisor → zygote
//! ([`ToZygote`]), zygote → supervisor ([`FromZygote`]), and the fork
//! path's hand-off from the intermediate process to the zygote
//! ([`Handoff`], see [`crate::host::fork`]).

use std::path::PathBuf;

use super::codec::{kind, open_frame, DecodeError, Enc, Message};
use crate::host::plugins::PluginSpec;

/// Supervisor → zygote.
#[derive(Debug, Clone, PartialEq)]
pub enum ToZygote {
    /// First message: load these plugins, in order.
    Hello {
        /// Plugins, in load order.
        plugins: Vec<PluginSpec>,
    },
    /// Fork one worker.
    Fork {
        /// Echoed in the answer.
        id: u64,
    },
}

/// How a worker the zygote reaped ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerExit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

/// Zygote → supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromZygote {
    /// Plugins loaded; ready to fork.
    Ready {
        /// The zygote's pid.
        pid: i32,
        /// Plugins loaded.
        plugins: u32,
    },
    /// Plugins failed to load; the zygote exits.
    HelloFailed {
        /// Why (the error and its causes).
        reason: String,
    },
    /// A worker exists. Descriptors: `[pidfd, channel]`, the worker's pidfd
    /// and the supervisor's end of its control socket.
    Forked {
        /// The request's id.
        id: u64,
        /// The worker's pid.
        pid: i32,
    },
    /// No worker could be forked.
    ForkFailed {
        /// The request's id.
        id: u64,
        /// Why.
        reason: String,
    },
    /// A worker ended and the zygote reaped it. Only from a zygote that is
    /// its workers' reaper (a child subreaper: module-runtime's test
    /// zygote); emberd's zygote never sends it, emberd reaps its workers.
    Reaped {
        /// The worker's pid.
        pid: i32,
        /// How it ended.
        exit: WorkerExit,
    },
}

/// Intermediate process → zygote, once per fork (see
/// [`crate::host::fork`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handoff {
    /// The worker exists. Descriptor: its pidfd.
    HandedOver {
        /// The worker's pid.
        pid: i32,
    },
    /// No worker: this call failed with this errno.
    Failed {
        /// `fork` or `pidfd_open`.
        call: String,
        /// The errno.
        errno: i32,
    },
}

impl Message for ToZygote {
    const DIRECTION: &'static str = "supervisor → zygote";

    fn encode(&self) -> Vec<u8> {
        match self {
            ToZygote::Hello { plugins } => {
                let mut e = Enc::new(kind::HELLO);
                e.len(plugins.len());
                for p in plugins {
                    e.str(&p.path.to_string_lossy());
                    // A table (parsed from TOML or built of TOML values)
                    // always serializes.
                    e.str(&toml::to_string(&p.config).expect("a TOML table serializes"));
                }
                e.finish()
            }
            ToZygote::Fork { id } => {
                let mut e = Enc::new(kind::FORK);
                e.u64(*id);
                e.finish()
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (k, mut d) = open_frame(buf)?;
        let msg = match k {
            kind::HELLO => {
                let n = d.count("plugins", 8)?;
                let mut plugins = Vec::with_capacity(n);
                for _ in 0..n {
                    let path = PathBuf::from(d.str("plugin path")?);
                    let text = d.str("plugin config")?;
                    let config = toml::from_str(&text).map_err(|e| DecodeError::Malformed {
                        field: "plugin config",
                        reason: e.message().to_owned(),
                    })?;
                    plugins.push(PluginSpec { path, config });
                }
                ToZygote::Hello { plugins }
            }
            kind::FORK => ToZygote::Fork { id: d.u64("id")? },
            other => {
                return Err(DecodeError::UnknownKind {
                    kind: other,
                    direction: Self::DIRECTION,
                })
            }
        };
        d.finish()?;
        Ok(msg)
    }
}

impl Message for FromZygote {
    const DIRECTION: &'static str = "zygote → supervisor";

    fn fd_count(&self) -> usize {
        match self {
            FromZygote::Forked { .. } => 2,
            _ => 0,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            FromZygote::Ready { pid, plugins } => {
                let mut e = Enc::new(kind::READY);
                e.i32(*pid);
                e.u32(*plugins);
                e.finish()
            }
            FromZygote::HelloFailed { reason } => {
                let mut e = Enc::new(kind::HELLO_FAILED);
                e.str(reason);
                e.finish()
            }
            FromZygote::Forked { id, pid } => {
                let mut e = Enc::new(kind::FORKED);
                e.u64(*id);
                e.i32(*pid);
                e.finish()
            }
            FromZygote::ForkFailed { id, reason } => {
                let mut e = Enc::new(kind::FORK_FAILED);
                e.u64(*id);
                e.str(reason);
                e.finish()
            }
            FromZygote::Reaped { pid, exit } => {
                let mut e = Enc::new(kind::REAPED);
                e.i32(*pid);
                let (how, value) = match exit {
                    WorkerExit::Code(c) => (1, *c),
                    WorkerExit::Signal(s) => (2, *s),
                };
                e.u8(how);
                e.i32(value);
                e.finish()
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (k, mut d) = open_frame(buf)?;
        let msg = match k {
            kind::READY => FromZygote::Ready {
                pid: d.i32("pid")?,
                plugins: d.u32("plugins")?,
            },
            kind::HELLO_FAILED => FromZygote::HelloFailed {
                reason: d.str("reason")?,
            },
            kind::FORKED => FromZygote::Forked {
                id: d.u64("id")?,
                pid: d.i32("pid")?,
            },
            kind::FORK_FAILED => FromZygote::ForkFailed {
                id: d.u64("id")?,
                reason: d.str("reason")?,
            },
            kind::REAPED => {
                let pid = d.i32("pid")?;
                let exit = match d.u8("exit kind")? {
                    1 => WorkerExit::Code(d.i32("exit code")?),
                    2 => WorkerExit::Signal(d.i32("signal")?),
                    v => {
                        return Err(DecodeError::InvalidValue {
                            field: "exit kind",
                            value: v.into(),
                        })
                    }
                };
                FromZygote::Reaped { pid, exit }
            }
            other => {
                return Err(DecodeError::UnknownKind {
                    kind: other,
                    direction: Self::DIRECTION,
                })
            }
        };
        d.finish()?;
        Ok(msg)
    }
}

impl Message for Handoff {
    const DIRECTION: &'static str = "intermediate → zygote";

    fn fd_count(&self) -> usize {
        match self {
            Handoff::HandedOver { .. } => 1,
            Handoff::Failed { .. } => 0,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Handoff::HandedOver { pid } => {
                let mut e = Enc::new(kind::HANDED_OVER);
                e.i32(*pid);
                e.finish()
            }
            Handoff::Failed { call, errno } => {
                let mut e = Enc::new(kind::HANDOFF_FAILED);
                e.str(call);
                e.i32(*errno);
                e.finish()
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (k, mut d) = open_frame(buf)?;
        let msg = match k {
            kind::HANDED_OVER => Handoff::HandedOver { pid: d.i32("pid")? },
            kind::HANDOFF_FAILED => Handoff::Failed {
                call: d.str("call")?,
                errno: d.i32("errno")?,
            },
            other => {
                return Err(DecodeError::UnknownKind {
                    kind: other,
                    direction: Self::DIRECTION,
                })
            }
        };
        d.finish()?;
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plugin(path: &str, config: &str) -> PluginSpec {
        PluginSpec {
            path: path.into(),
            config: toml::from_str(config).unwrap(),
        }
    }

    #[test]
    fn zygote_messages_round_trip() {
        for m in [
            ToZygote::Hello {
                plugins: vec![
                    plugin("/p/libcatalog.so", "size_mb = 200\n[nested]\nx = \"y\"\n"),
                    plugin("/p/libother.so", ""),
                ],
            },
            ToZygote::Hello { plugins: vec![] },
            ToZygote::Fork { id: u64::MAX },
        ] {
            assert_eq!(ToZygote::decode(&m.encode()).unwrap(), m);
        }
        for m in [
            FromZygote::Ready { pid: 7, plugins: 2 },
            FromZygote::HelloFailed {
                reason: "plugin `x`: init failed".into(),
            },
            FromZygote::Forked { id: 3, pid: 99 },
            FromZygote::ForkFailed {
                id: 4,
                reason: "the zygote has 2 threads".into(),
            },
            FromZygote::Reaped {
                pid: 5,
                exit: WorkerExit::Code(12),
            },
            FromZygote::Reaped {
                pid: 6,
                exit: WorkerExit::Signal(11),
            },
        ] {
            assert_eq!(FromZygote::decode(&m.encode()).unwrap(), m);
        }
        for m in [
            Handoff::HandedOver { pid: 8 },
            Handoff::Failed {
                call: "pidfd_open".into(),
                errno: 24,
            },
        ] {
            assert_eq!(Handoff::decode(&m.encode()).unwrap(), m);
        }
        assert_eq!(FromZygote::Forked { id: 0, pid: 0 }.fd_count(), 2);
        assert_eq!(Handoff::HandedOver { pid: 0 }.fd_count(), 1);
    }

    #[test]
    fn a_message_for_another_link_is_refused_by_kind() {
        let hello = ToZygote::Fork { id: 1 }.encode();
        let e = FromZygote::decode(&hello).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown frame kind 201 for a zygote → supervisor message"
        );
        let stop = crate::protocol::ToWorker::Stop {
            deadline: std::time::Duration::ZERO,
        }
        .encode();
        assert!(matches!(
            ToZygote::decode(&stop),
            Err(DecodeError::UnknownKind { kind: 2, .. })
        ));
    }

    #[test]
    fn a_plugin_config_that_is_not_toml_is_named() {
        let mut e = Enc::new(kind::HELLO);
        e.len(1);
        e.str("/p/lib.so");
        e.str("size_mb = = 3");
        let err = ToZygote::decode(&e.finish()).unwrap_err();
        assert!(
            matches!(
                &err,
                DecodeError::Malformed {
                    field: "plugin config",
                    ..
                }
            ),
            "{err}"
        );
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = ToZygote::decode(&bytes);
            let _ = FromZygote::decode(&bytes);
            let _ = Handoff::decode(&bytes);
        }
    }
}
