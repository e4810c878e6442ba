//! The control protocol: the typed messages emberd, the zygote and the
//! workers exchange, one codec for all of them ([`codec`]: `EMBW` frames),
//! carried by [`crate::transport`] (`SOCK_SEQPACKET`, descriptors with
//! `SCM_RIGHTS`). This file holds the worker's messages (parent ↔ worker);
//! [`zygote`] the zygote's (supervisor ↔ zygote) and the fork path's
//! hand-off. Wire format: `docs/abi.md` §4.

pub mod codec;
pub mod zygote;

use std::path::PathBuf;
use std::time::Duration;

use crate::abi::GrantKind;
use crate::transport::Link;
use codec::{kind, open_frame, Enc};
pub use codec::{DecodeError, Message, MAX_FRAME, PROTOCOL_VERSION};
pub use zygote::{FromZygote, ToZygote, WorkerExit};

/// Most cgroups one `JoinCgroups` names (one per hierarchy in use).
pub const MAX_CGROUPS: u32 = 8;

/// A descriptor grant in a launch order. The descriptors travel as
/// `SCM_RIGHTS` in grant order, [`GrantKind::fd_count`] each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// What the descriptors are.
    pub kind: GrantKind,
    /// Name from the manifest.
    pub name: String,
}

/// Everything a warm worker needs to become an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchOrder {
    /// Absolute path of the module `cdylib`.
    pub artifact: PathBuf,
    /// The manifest text (the worker parses and validates it again).
    pub manifest: String,
    /// Replica index.
    pub replica: u32,
    /// The host enforces the manifest's `limits.memory` with a cgroup. When
    /// not (the host samples the worker's memory instead), the worker caps
    /// its own address space as a backstop.
    pub memory_enforced: bool,
    /// Descriptor grants, in the order of the attached descriptors.
    pub grants: Vec<Grant>,
    /// The sandbox to apply before loading (`None`: off, by emberd's
    /// configuration).
    pub sandbox: Option<SandboxOrder>,
}

/// What the worker gives up before loading the module (see
/// `host::sandbox`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxOrder {
    /// The module's own uid and gid; `None`: the worker keeps emberd's
    /// (emberd is not root and cannot switch).
    pub ids: Option<(u32, u32)>,
    /// Denied syscalls the module may use all the same (its manifest's
    /// `[sandbox] allow_syscalls`, granted by emberd's configuration).
    pub allow_syscalls: Vec<String>,
    /// Paths the module may write (its manifest's `[sandbox] writable`).
    pub writable: Vec<PathBuf>,
}

/// What is in force in a worker once its sandbox is applied, as the worker
/// itself reads it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxReport {
    /// Its uid.
    pub uid: u32,
    /// Its gid.
    pub gid: u32,
    /// It switched to the module's own uid and gid (else it kept emberd's).
    pub own_ids: bool,
    /// `PR_GET_NO_NEW_PRIVS`.
    pub no_new_privs: bool,
    /// `PR_GET_DUMPABLE`.
    pub dumpable: bool,
    /// The seccomp filter in force, or `none …`.
    pub seccomp: String,
    /// The Landlock ABI in force, or `none (why)`.
    pub landlock: String,
    /// The paths it may write besides `/dev/null`, `/dev/zero` and
    /// `/dev/full` (its manifest's `[sandbox] writable`, each opened
    /// with the module's credentials after the uid switch, no symlink
    /// followed); empty with the sandbox
    /// off. Enforced by Landlock only where `landlock` names an ABI.
    pub writable: Vec<PathBuf>,
}

impl LaunchOrder {
    /// Number of descriptors that must travel with this order.
    pub fn fd_count(&self) -> usize {
        fd_count(&self.grants)
    }
}

/// Number of descriptors that must travel with `grants`.
pub fn fd_count(grants: &[Grant]) -> usize {
    grants.iter().map(|g| g.kind.fd_count()).sum()
}

/// Parent → worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToWorker {
    /// Load and run a module (descriptors attached).
    Launch(LaunchOrder),
    /// More descriptor grants for the running instance (descriptors
    /// attached), e.g. the server end for a newly launched importer.
    Attach(Vec<Grant>),
    /// Join the cgroups whose `tasks` files (cgroup v1, opened for writing
    /// by the parent) are attached, `count` of them: the worker writes `0`
    /// to each (it moves its own, only thread, which spares the kernel's
    /// global threadgroup lock and its RCU grace period) and closes them.
    /// For an idle worker; a running instance ignores it.
    JoinCgroups {
        /// How many `tasks` files are attached.
        count: u32,
    },
    /// Stop gracefully; the process must be gone within `deadline`.
    Stop {
        /// Time the module gets to wind down.
        deadline: Duration,
    },
}

/// Lifecycle states a worker reports, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Checking and loading the artifact.
    Loading = 1,
    /// Loaded; ABI and SDK versions checked.
    Loaded = 2,
    /// Calling the module's `start`.
    Starting = 3,
    /// The module is ready to serve (it called `ready`).
    Ready = 4,
    /// Calling `serve`.
    Serving = 5,
    /// Shutdown requested; the module is winding down.
    Stopping = 6,
    /// `stop` returned; the process exits next.
    Stopped = 7,
}

impl State {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Loading,
            2 => Self::Loaded,
            3 => Self::Starting,
            4 => Self::Ready,
            5 => Self::Serving,
            6 => Self::Stopping,
            7 => Self::Stopped,
            _ => return None,
        })
    }
}

/// Where in the lifecycle a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Stage {
    /// Reading the launch order and its descriptors.
    Launch = 1,
    /// Checking or loading the artifact.
    Load = 2,
    /// In `start`, or before `ready`.
    Start = 3,
    /// In `serve`.
    Serve = 4,
    /// In `stop`, or after the stop deadline.
    Stop = 5,
}

impl Stage {
    fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Self::Launch,
            2 => Self::Load,
            3 => Self::Start,
            4 => Self::Serve,
            5 => Self::Stop,
            _ => return None,
        })
    }
}

/// What went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum FailureKind {
    /// The launch order was malformed (descriptor count, manifest).
    BadLaunchOrder = 1,
    /// Not an ELF shared object for this host.
    BadArtifact = 2,
    /// `dlopen` failed.
    DlopenFailed = 3,
    /// The descriptor symbol is missing.
    MissingSymbol = 4,
    /// ABI version, magic or SDK version mismatch.
    AbiMismatch = 5,
    /// The module returned an error.
    ModuleError = 6,
    /// The module panicked.
    Panic = 7,
    /// The module did not call `ready` within its start deadline.
    NeverReady = 8,
    /// The process did not exit within the stop deadline.
    StopDeadlineExceeded = 9,
    /// The module exceeded its memory limit.
    MemoryLimitExceeded = 10,
    /// A fatal signal (segfault, abort, ...).
    Crashed = 11,
    /// The sandbox could not be applied (uid switch, seccomp, Landlock);
    /// the module's code was not loaded.
    Sandbox = 12,
    /// The idle worker could not join its cgroup (`JoinCgroups`).
    Cgroup = 13,
}

impl FailureKind {
    fn from_u16(v: u16) -> Option<Self> {
        use FailureKind::*;
        Some(match v {
            1 => BadLaunchOrder,
            2 => BadArtifact,
            3 => DlopenFailed,
            4 => MissingSymbol,
            5 => AbiMismatch,
            6 => ModuleError,
            7 => Panic,
            8 => NeverReady,
            9 => StopDeadlineExceeded,
            10 => MemoryLimitExceeded,
            11 => Crashed,
            12 => Sandbox,
            13 => Cgroup,
            _ => return None,
        })
    }
}

/// A failure report; the worker exits right after sending it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Where.
    pub stage: Stage,
    /// What.
    pub kind: FailureKind,
    /// Human-readable detail (panic message, loader error, signal name).
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} failed ({:?}): {}",
            self.stage, self.kind, self.message
        )
    }
}

/// Log levels in [`FromWorker::Log`], as in `tracing`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum LogLevel {
    /// Error.
    Error = 1,
    /// Warning.
    Warn = 2,
    /// Info.
    Info = 3,
    /// Debug.
    Debug = 4,
    /// Trace.
    Trace = 5,
}

impl LogLevel {
    /// Parses the wire value; unknown values become `Info`.
    pub fn from_u32(v: u32) -> Self {
        match v {
            1 => Self::Error,
            2 => Self::Warn,
            4 => Self::Debug,
            5 => Self::Trace,
            _ => Self::Info,
        }
    }
}

/// Worker → parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromWorker {
    /// The worker is warm and waits for a launch order.
    Idle {
        /// Its pid.
        pid: u32,
        /// Module ABI version it loads.
        abi_version: u32,
        /// Its SDK version.
        sdk_version: String,
    },
    /// A lifecycle transition.
    Transition {
        /// The new state.
        state: State,
        /// Detail (e.g. artifact path, SDK version).
        detail: String,
    },
    /// A failure; the worker exits next.
    Failed(Failure),
    /// The sandbox is applied (sent before `Loading`).
    Sandboxed(SandboxReport),
    /// A log record from the module or the worker.
    Log {
        /// Level.
        level: LogLevel,
        /// `tracing` target.
        target: String,
        /// Formatted message and fields.
        message: String,
    },
}

impl Message for ToWorker {
    const DIRECTION: &'static str = "parent → worker";

    fn fd_count(&self) -> usize {
        match self {
            ToWorker::Launch(o) => o.fd_count(),
            ToWorker::Attach(grants) => fd_count(grants),
            ToWorker::Stop { .. } => 0,
            ToWorker::JoinCgroups { count } => *count as usize,
        }
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            ToWorker::Launch(o) => {
                let mut e = Enc::new(kind::LAUNCH);
                e.str(&o.artifact.to_string_lossy());
                e.str(&o.manifest);
                e.u32(o.replica);
                e.u32(u32::from(o.memory_enforced));
                e.grants(&o.grants);
                match &o.sandbox {
                    None => e.u8(0),
                    Some(sb) => {
                        e.u8(1);
                        let (uid, gid) = sb.ids.unwrap_or((0, 0));
                        e.flag(sb.ids.is_some());
                        e.u32(uid);
                        e.u32(gid);
                        e.strs(sb.allow_syscalls.iter().map(String::as_str));
                        let w: Vec<String> = sb
                            .writable
                            .iter()
                            .map(|p| p.to_string_lossy().into_owned())
                            .collect();
                        e.strs(w.iter().map(String::as_str));
                    }
                }
                e.finish()
            }
            ToWorker::Attach(grants) => {
                let mut e = Enc::new(kind::ATTACH);
                e.grants(grants);
                e.finish()
            }
            ToWorker::JoinCgroups { count } => {
                let mut e = Enc::new(kind::JOIN_CGROUPS);
                e.u32(*count);
                e.finish()
            }
            ToWorker::Stop { deadline } => {
                let mut e = Enc::new(kind::STOP);
                e.u64(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX));
                e.finish()
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (k, mut d) = open_frame(buf)?;
        let msg = match k {
            kind::LAUNCH => {
                let artifact = PathBuf::from(d.str("artifact")?);
                let manifest = d.str("manifest")?;
                let replica = d.u32("replica")?;
                let memory_enforced = match d.u32("memory enforced")? {
                    0 => false,
                    1 => true,
                    value => {
                        return Err(DecodeError::InvalidValue {
                            field: "memory enforced",
                            value: value.into(),
                        })
                    }
                };
                let grants = d.grants()?;
                let sandbox = if d.flag("sandbox")? {
                    let own = d.flag("sandbox own ids")?;
                    let ids = (d.u32("sandbox uid")?, d.u32("sandbox gid")?);
                    Some(SandboxOrder {
                        ids: own.then_some(ids),
                        allow_syscalls: d.strs("allowed syscalls")?,
                        writable: d
                            .strs("writable paths")?
                            .into_iter()
                            .map(PathBuf::from)
                            .collect(),
                    })
                } else {
                    None
                };
                ToWorker::Launch(LaunchOrder {
                    artifact,
                    manifest,
                    replica,
                    memory_enforced,
                    grants,
                    sandbox,
                })
            }
            kind::ATTACH => ToWorker::Attach(d.grants()?),
            kind::JOIN_CGROUPS => match d.u32("cgroup count")? {
                count @ 1..=MAX_CGROUPS => ToWorker::JoinCgroups { count },
                v => {
                    return Err(DecodeError::InvalidValue {
                        field: "cgroup count",
                        value: v.into(),
                    })
                }
            },
            kind::STOP => ToWorker::Stop {
                deadline: Duration::from_millis(d.u64("stop deadline")?),
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

impl Message for FromWorker {
    const DIRECTION: &'static str = "worker → parent";

    fn encode(&self) -> Vec<u8> {
        match self {
            FromWorker::Idle {
                pid,
                abi_version,
                sdk_version,
            } => {
                let mut e = Enc::new(kind::IDLE);
                e.u32(*pid);
                e.u32(*abi_version);
                e.str(sdk_version);
                e.finish()
            }
            FromWorker::Transition { state, detail } => {
                let mut e = Enc::new(kind::TRANSITION);
                e.u8(*state as u8);
                e.str(detail);
                e.finish()
            }
            FromWorker::Failed(f) => {
                let mut e = Enc::new(kind::FAILED);
                e.u8(f.stage as u8);
                e.u16(f.kind as u16);
                e.str(&f.message);
                e.finish()
            }
            FromWorker::Sandboxed(r) => {
                let mut e = Enc::new(kind::SANDBOXED);
                e.u32(r.uid);
                e.u32(r.gid);
                e.flag(r.own_ids);
                e.flag(r.no_new_privs);
                e.flag(r.dumpable);
                e.str(&r.seccomp);
                e.str(&r.landlock);
                let w: Vec<String> = r
                    .writable
                    .iter()
                    .map(|p| p.to_string_lossy().into_owned())
                    .collect();
                e.strs(w.iter().map(String::as_str));
                e.finish()
            }
            FromWorker::Log {
                level,
                target,
                message,
            } => {
                let mut e = Enc::new(kind::LOG);
                e.u8(*level as u8);
                e.str(target);
                e.str(message);
                e.finish()
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (k, mut d) = open_frame(buf)?;
        let msg = match k {
            kind::IDLE => FromWorker::Idle {
                pid: d.u32("pid")?,
                abi_version: d.u32("abi version")?,
                sdk_version: d.str("sdk version")?,
            },
            kind::TRANSITION => {
                let v = d.u8("state")?;
                let state = State::from_u8(v).ok_or(DecodeError::InvalidValue {
                    field: "state",
                    value: v.into(),
                })?;
                FromWorker::Transition {
                    state,
                    detail: d.str("detail")?,
                }
            }
            kind::FAILED => {
                let v = d.u8("stage")?;
                let stage = Stage::from_u8(v).ok_or(DecodeError::InvalidValue {
                    field: "stage",
                    value: v.into(),
                })?;
                let v = d.u16("failure kind")?;
                let kind = FailureKind::from_u16(v).ok_or(DecodeError::InvalidValue {
                    field: "failure kind",
                    value: v.into(),
                })?;
                FromWorker::Failed(Failure {
                    stage,
                    kind,
                    message: d.str("message")?,
                })
            }
            kind::SANDBOXED => FromWorker::Sandboxed(SandboxReport {
                uid: d.u32("uid")?,
                gid: d.u32("gid")?,
                own_ids: d.flag("own ids")?,
                no_new_privs: d.flag("no new privs")?,
                dumpable: d.flag("dumpable")?,
                seccomp: d.str("seccomp")?,
                landlock: d.str("landlock")?,
                writable: d
                    .strs("writable paths")?
                    .into_iter()
                    .map(PathBuf::from)
                    .collect(),
            }),
            kind::LOG => {
                let level = LogLevel::from_u32(d.u8("log level")?.into());
                FromWorker::Log {
                    level,
                    target: d.str("log target")?,
                    message: d.str("log message")?,
                }
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

/// The parent's end of a worker's link.
pub type ParentChannel = Link<ToWorker, FromWorker>;
/// The worker's end.
pub type WorkerChannel = Link<FromWorker, ToWorker>;

#[cfg(test)]
mod tests {
    use super::*;
    use codec::MAGIC;

    fn samples_to() -> Vec<ToWorker> {
        vec![
            ToWorker::Launch(LaunchOrder {
                artifact: "/x/libhello.so".into(),
                manifest: "name = \"hello\"".into(),
                replica: 3,
                memory_enforced: true,
                grants: vec![
                    Grant {
                        kind: GrantKind::Listener,
                        name: "http".into(),
                    },
                    Grant {
                        kind: GrantKind::Import,
                        name: "kv".into(),
                    },
                ],
                sandbox: Some(SandboxOrder {
                    ids: Some((1_879_048_193, 1_879_048_193)),
                    allow_syscalls: vec!["ptrace".into()],
                    writable: vec!["/var/lib/hello".into()],
                }),
            }),
            ToWorker::Launch(LaunchOrder {
                artifact: "/x/libkv.so".into(),
                manifest: String::new(),
                replica: 0,
                memory_enforced: false,
                grants: Vec::new(),
                sandbox: None,
            }),
            ToWorker::Stop {
                deadline: Duration::from_millis(1500),
            },
            ToWorker::Attach(vec![Grant {
                kind: GrantKind::Export,
                name: "kv".into(),
            }]),
            ToWorker::JoinCgroups { count: 2 },
        ]
    }

    fn samples_from() -> Vec<FromWorker> {
        vec![
            FromWorker::Idle {
                pid: 42,
                abi_version: 1,
                sdk_version: "0.1.0".into(),
            },
            FromWorker::Transition {
                state: State::Ready,
                detail: String::new(),
            },
            FromWorker::Failed(Failure {
                stage: Stage::Start,
                kind: FailureKind::Panic,
                message: "boom".into(),
            }),
            FromWorker::Log {
                level: LogLevel::Warn,
                target: "hello".into(),
                message: "hi x=1".into(),
            },
            FromWorker::Sandboxed(SandboxReport {
                uid: 7,
                gid: 8,
                own_ids: true,
                no_new_privs: true,
                dumpable: false,
                seccomp: "seccomp-bpf".into(),
                landlock: "landlock ABI 7".into(),
                writable: vec!["/var/lib/hello".into(), "/tmp/x".into()],
            }),
        ]
    }

    #[test]
    fn frames_round_trip() {
        for m in samples_to() {
            assert_eq!(ToWorker::decode(&m.encode()).unwrap(), m);
        }
        for m in samples_from() {
            assert_eq!(FromWorker::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn launch_order_counts_descriptors() {
        let ToWorker::Launch(o) = &samples_to()[0] else {
            unreachable!()
        };
        assert_eq!(o.fd_count(), 3);
    }

    #[test]
    fn corrupt_frames_are_typed_errors_naming_the_field() {
        let f = samples_from()[2].encode();
        // Cut anywhere: a truncation error, never a panic or a wrong value.
        for cut in 0..f.len() {
            let e = FromWorker::decode(&f[..cut]).unwrap_err();
            assert!(matches!(e, DecodeError::Truncated { .. }), "{cut}: {e}");
        }
        // A body cut short after its header was rewritten to match.
        let mut short = f[..f.len() - 2].to_vec();
        let body = (short.len() - codec::HEADER) as u32;
        short[8..12].copy_from_slice(&body.to_le_bytes());
        assert_eq!(
            FromWorker::decode(&short).unwrap_err().to_string(),
            "frame truncated: message needs 4 bytes, 2 left"
        );
        let mut bad = f.clone();
        bad[0] = b'X';
        assert!(matches!(
            FromWorker::decode(&bad),
            Err(DecodeError::BadMagic { .. })
        ));
        let mut f = samples_from()[1].encode();
        f[12] = 99;
        assert_eq!(
            FromWorker::decode(&f).unwrap_err().to_string(),
            "invalid value 99 for state"
        );
        let mut f = samples_to()[1].encode();
        f.push(0);
        assert!(matches!(
            ToWorker::decode(&f),
            Err(DecodeError::Trailing(1))
        ));
        // Trailing bytes inside a body whose length says so.
        let mut f = samples_to()[2].encode();
        f.push(0);
        let body = (f.len() - codec::HEADER) as u32;
        f[8..12].copy_from_slice(&body.to_le_bytes());
        assert_eq!(
            ToWorker::decode(&f).unwrap_err().to_string(),
            "1 trailing bytes after the message"
        );
        // Invalid UTF-8 in a string names the field.
        let mut f = samples_from()[3].encode();
        let at = codec::HEADER + 1 + 4;
        f[at] = 0xff;
        assert_eq!(
            FromWorker::decode(&f).unwrap_err().to_string(),
            "log target is not UTF-8"
        );
        assert_eq!(
            ToWorker::decode(&samples_from()[0].encode())
                .unwrap_err()
                .to_string(),
            "unknown frame kind 100 for a parent → worker message"
        );
        for count in [0, MAX_CGROUPS + 1] {
            let mut e = Enc::new(kind::JOIN_CGROUPS);
            e.u32(count);
            assert_eq!(
                ToWorker::decode(&e.finish()).unwrap_err().to_string(),
                format!("invalid value {count} for cgroup count")
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn decoders_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = ToWorker::decode(&bytes);
            let _ = FromWorker::decode(&bytes);
        }

        #[test]
        fn decoders_never_panic_with_valid_header(kind in 0u16..200, body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..128)) {
            let mut f = Vec::new();
            f.extend_from_slice(&MAGIC);
            f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            f.extend_from_slice(&kind.to_le_bytes());
            f.extend_from_slice(&(body.len() as u32).to_le_bytes());
            f.extend_from_slice(&body);
            let _ = ToWorker::decode(&f);
            let _ = FromWorker::decode(&f);
        }
    }
}
