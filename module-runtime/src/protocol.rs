//! The worker control protocol: the typed messages a parent (the supervisor,
//! or a test zygote) and a worker exchange over a `SOCK_SEQPACKET` Unix
//! socket, one message per packet, descriptors attached with `SCM_RIGHTS`.
//! Wire format: `docs/abi.md`, section "Worker control protocol".
//!
//! Every frame is `magic "EMBW" | u16 version | u16 kind | u32 body_len | body`,
//! little-endian. Strings are `u32 len | UTF-8`. The length prefix also lets
//! the frames travel over a stream transport.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

use crate::abi::GrantKind;

/// Protocol version carried in every frame.
pub const PROTOCOL_VERSION: u16 = 1;
/// Largest frame accepted (header included).
pub const MAX_FRAME: usize = 1 << 20;
const MAGIC: [u8; 4] = *b"EMBW";
const HEADER: usize = 12;

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

/// A frame that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than its header or its declared body.
    #[error("frame truncated")]
    Truncated,
    /// Wrong magic.
    #[error("bad frame magic")]
    BadMagic,
    /// Unsupported protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u16),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// A field held a value outside its enum.
    #[error("invalid value {value} for {field}")]
    InvalidValue {
        /// Field.
        field: &'static str,
        /// Value.
        value: u32,
    },
    /// A string was not UTF-8.
    #[error("string is not UTF-8")]
    Utf8,
    /// Bytes left after the body.
    #[error("trailing bytes after frame body")]
    Trailing,
    /// Larger than [`MAX_FRAME`].
    #[error("frame too large")]
    TooLarge,
}

mod kind {
    pub const LAUNCH: u16 = 1;
    pub const STOP: u16 = 2;
    pub const ATTACH: u16 = 3;
    /// More descriptors of the message before it (no body).
    pub const MORE_FDS: u16 = 4;
    pub const IDLE: u16 = 100;
    pub const TRANSITION: u16 = 101;
    pub const FAILED: u16 = 102;
    pub const LOG: u16 = 103;
    pub const SANDBOXED: u16 = 104;
}

struct Enc(Vec<u8>);

impl Enc {
    fn new(kind: u16) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        Self(v)
    }
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn str(&mut self, s: &str) {
        // Strings longer than u32::MAX cannot be framed anyway (MAX_FRAME).
        self.u32(u32::try_from(s.len()).unwrap_or(u32::MAX));
        self.0.extend_from_slice(s.as_bytes());
    }
    fn grants(&mut self, grants: &[Grant]) {
        self.u32(u32::try_from(grants.len()).unwrap_or(u32::MAX));
        for g in grants {
            self.u32(g.kind as u32);
            self.str(&g.name);
        }
    }
    fn strs<'s>(&mut self, v: impl ExactSizeIterator<Item = &'s str>) {
        self.u32(u32::try_from(v.len()).unwrap_or(u32::MAX));
        for x in v {
            self.str(x);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        let body = u32::try_from(self.0.len() - HEADER).unwrap_or(u32::MAX);
        self.0[8..12].copy_from_slice(&body.to_le_bytes());
        self.0
    }
}

struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated);
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }
    fn grants(&mut self) -> Result<Vec<Grant>, DecodeError> {
        let n = self.u32()?;
        let mut grants = Vec::new();
        for _ in 0..n {
            let v = self.u32()?;
            let kind = GrantKind::from_u32(v).ok_or(DecodeError::InvalidValue {
                field: "grant kind",
                value: v,
            })?;
            grants.push(Grant {
                kind,
                name: self.str()?,
            });
        }
        Ok(grants)
    }
    fn strs(&mut self) -> Result<Vec<String>, DecodeError> {
        let n = self.u32()?;
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(self.str()?);
        }
        Ok(v)
    }
    fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::InvalidValue {
                field,
                value: v.into(),
            }),
        }
    }
    fn str(&mut self) -> Result<String, DecodeError> {
        let n = self.u32()? as usize;
        let b = self.take(n)?;
        String::from_utf8(b.to_vec()).map_err(|_| DecodeError::Utf8)
    }
}

/// Splits a frame into `(kind, body)` after checking its header.
fn open_frame(buf: &[u8]) -> Result<(u16, &[u8]), DecodeError> {
    if buf.len() > MAX_FRAME {
        return Err(DecodeError::TooLarge);
    }
    let mut d = Dec(buf);
    if d.take(4)? != MAGIC {
        return Err(DecodeError::BadMagic);
    }
    let version = d.u16()?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version));
    }
    let kind = d.u16()?;
    let len = d.u32()? as usize;
    let body = d.take(len)?;
    if !d.0.is_empty() {
        return Err(DecodeError::Trailing);
    }
    Ok((kind, body))
}

fn done(d: Dec<'_>) -> Result<(), DecodeError> {
    if d.0.is_empty() {
        Ok(())
    } else {
        Err(DecodeError::Trailing)
    }
}

/// A message type of the protocol.
pub trait Message: Sized {
    /// Encodes the frame.
    fn encode(&self) -> Vec<u8>;
    /// Decodes one complete frame.
    fn decode(buf: &[u8]) -> Result<Self, DecodeError>;
    /// How many descriptors travel with this message.
    fn fd_count(&self) -> usize {
        0
    }
}

/// Most descriptors one packet carries (what a receiver makes room for);
/// a message with more sends the rest in continuation packets.
pub const FDS_PER_PACKET: usize = shm_ipc::fdpass::MAX_FDS;

/// A continuation packet's frame: it carries the next descriptors of the
/// message before it, and nothing else.
pub fn more_fds_frame() -> Vec<u8> {
    Enc::new(kind::MORE_FDS).finish()
}

/// The packets one message travels in: its frame with the first
/// [`FDS_PER_PACKET`] descriptors, then continuation frames with the rest,
/// in order. The receiver ([`Channel::recv`]) reassembles them by the count
/// the message declares.
pub fn packets<'a, 'f>(
    frame: Vec<u8>,
    fds: &'a [BorrowedFd<'f>],
) -> impl Iterator<Item = (Vec<u8>, &'a [BorrowedFd<'f>])> {
    let first = fds.len().min(FDS_PER_PACKET);
    std::iter::once((frame, &fds[..first])).chain(
        fds[first..]
            .chunks(FDS_PER_PACKET)
            .map(|c| (more_fds_frame(), c)),
    )
}

impl Message for ToWorker {
    fn fd_count(&self) -> usize {
        match self {
            ToWorker::Launch(o) => o.fd_count(),
            ToWorker::Attach(grants) => fd_count(grants),
            ToWorker::Stop { .. } => 0,
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
                        e.u8(u8::from(sb.ids.is_some()));
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
            ToWorker::Stop { deadline } => {
                let mut e = Enc::new(kind::STOP);
                e.u64(u64::try_from(deadline.as_millis()).unwrap_or(u64::MAX));
                e.finish()
            }
        }
    }

    fn decode(buf: &[u8]) -> Result<Self, DecodeError> {
        let (k, body) = open_frame(buf)?;
        let mut d = Dec(body);
        let msg = match k {
            kind::LAUNCH => {
                let artifact = PathBuf::from(d.str()?);
                let manifest = d.str()?;
                let replica = d.u32()?;
                let memory_enforced = match d.u32()? {
                    0 => false,
                    1 => true,
                    value => {
                        return Err(DecodeError::InvalidValue {
                            field: "memory enforced",
                            value,
                        })
                    }
                };
                let grants = d.grants()?;
                let sandbox = if d.flag("sandbox")? {
                    let own = d.flag("sandbox ids")?;
                    let ids = (d.u32()?, d.u32()?);
                    Some(SandboxOrder {
                        ids: own.then_some(ids),
                        allow_syscalls: d.strs()?,
                        writable: d.strs()?.into_iter().map(PathBuf::from).collect(),
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
            kind::STOP => ToWorker::Stop {
                deadline: Duration::from_millis(d.u64()?),
            },
            other => return Err(DecodeError::UnknownKind(other)),
        };
        done(d)?;
        Ok(msg)
    }
}

impl Message for FromWorker {
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
                e.u8(u8::from(r.own_ids));
                e.u8(u8::from(r.no_new_privs));
                e.u8(u8::from(r.dumpable));
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
        let (k, body) = open_frame(buf)?;
        let mut d = Dec(body);
        let msg = match k {
            kind::IDLE => FromWorker::Idle {
                pid: d.u32()?,
                abi_version: d.u32()?,
                sdk_version: d.str()?,
            },
            kind::TRANSITION => {
                let v = d.u8()?;
                let state = State::from_u8(v).ok_or(DecodeError::InvalidValue {
                    field: "state",
                    value: v.into(),
                })?;
                FromWorker::Transition {
                    state,
                    detail: d.str()?,
                }
            }
            kind::FAILED => {
                let v = d.u8()?;
                let stage = Stage::from_u8(v).ok_or(DecodeError::InvalidValue {
                    field: "stage",
                    value: v.into(),
                })?;
                let v = d.u16()?;
                let kind = FailureKind::from_u16(v).ok_or(DecodeError::InvalidValue {
                    field: "failure kind",
                    value: v.into(),
                })?;
                FromWorker::Failed(Failure {
                    stage,
                    kind,
                    message: d.str()?,
                })
            }
            kind::SANDBOXED => FromWorker::Sandboxed(SandboxReport {
                uid: d.u32()?,
                gid: d.u32()?,
                own_ids: d.flag("own ids")?,
                no_new_privs: d.flag("no new privs")?,
                dumpable: d.flag("dumpable")?,
                seccomp: d.str()?,
                landlock: d.str()?,
                writable: d.strs()?.into_iter().map(PathBuf::from).collect(),
            }),
            kind::LOG => {
                let level = LogLevel::from_u32(d.u8()?.into());
                FromWorker::Log {
                    level,
                    target: d.str()?,
                    message: d.str()?,
                }
            }
            other => return Err(DecodeError::UnknownKind(other)),
        };
        done(d)?;
        Ok(msg)
    }
}

/// Errors sending or receiving a frame.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The socket call failed.
    #[error("control socket i/o failed")]
    Io(#[source] std::io::Error),
    /// The peer closed the socket.
    #[error("control socket closed by peer")]
    Closed,
    /// Nothing arrived in time.
    #[error("timed out waiting for a control message")]
    Timeout,
    /// The frame did not decode.
    #[error("malformed control message")]
    Decode(#[source] DecodeError),
    /// A message's descriptors did not all arrive (or more did).
    #[error("a control message lists {expected} descriptors but {arrived} arrived")]
    Descriptors {
        /// What the message declares.
        expected: usize,
        /// What arrived with it and its continuation packets.
        arrived: usize,
    },
}

/// Creates a connected `SOCK_SEQPACKET` pair (close-on-exec) for a parent and
/// a worker.
pub fn socket_pair() -> Result<(OwnedFd, OwnedFd), ChannelError> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| ChannelError::Io(e.into()))
}

/// One end of a control socket, sending `Out` and receiving `In`.
#[derive(Debug)]
pub struct Channel<Out, In> {
    sock: OwnedFd,
    _marker: std::marker::PhantomData<fn(Out) -> In>,
}

/// The parent's end.
pub type ParentChannel = Channel<ToWorker, FromWorker>;
/// The worker's end.
pub type WorkerChannel = Channel<FromWorker, ToWorker>;

impl<Out: Message, In: Message> Channel<Out, In> {
    /// Wraps a connected `SOCK_SEQPACKET` socket.
    pub fn new(sock: OwnedFd) -> Self {
        Self {
            sock,
            _marker: std::marker::PhantomData,
        }
    }

    /// The socket.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }

    /// Gives the socket back.
    pub fn into_inner(self) -> OwnedFd {
        self.sock
    }

    /// Sends one message with `fds` attached (in several packets if there
    /// are more than [`FDS_PER_PACKET`]).
    pub fn send(&self, msg: &Out, fds: &[BorrowedFd<'_>]) -> Result<(), ChannelError> {
        for (frame, fds) in packets(msg.encode(), fds) {
            send_frame(self.sock.as_fd(), &frame, fds)?;
        }
        Ok(())
    }

    /// Receives one message, blocking.
    pub fn recv(&self) -> Result<(In, Vec<OwnedFd>), ChannelError> {
        self.recv_timeout(None)
    }

    /// Receives one message, waiting at most `timeout` (`None`: forever).
    pub fn recv_timeout(
        &self,
        timeout: Option<Duration>,
    ) -> Result<(In, Vec<OwnedFd>), ChannelError> {
        if let Some(t) = timeout {
            if !wait_readable(self.sock.as_fd(), t)? {
                return Err(ChannelError::Timeout);
            }
        }
        let mut buf = vec![0u8; MAX_FRAME];
        let (n, mut fds) = self.recv_packet(&mut buf)?;
        let msg = In::decode(&buf[..n]).map_err(ChannelError::Decode)?;
        // The rest of its descriptors follow in continuation packets, sent
        // back to back by the peer.
        let expected = msg.fd_count();
        while fds.len() < expected {
            let short = ChannelError::Descriptors {
                expected,
                arrived: fds.len(),
            };
            if !wait_readable(self.sock.as_fd(), CONTINUATION_WAIT)? {
                return Err(short);
            }
            let (n, more) = self.recv_packet(&mut buf)?;
            match open_frame(&buf[..n]) {
                Ok((kind::MORE_FDS, [])) if !more.is_empty() => fds.extend(more),
                _ => return Err(short),
            }
        }
        if fds.len() > expected {
            return Err(ChannelError::Descriptors {
                expected,
                arrived: fds.len(),
            });
        }
        Ok((msg, fds))
    }

    /// One packet and its descriptors; a truncated descriptor list (more
    /// than [`FDS_PER_PACKET`] in one packet) is an error.
    fn recv_packet(&self, buf: &mut [u8]) -> Result<(usize, Vec<OwnedFd>), ChannelError> {
        let (n, fds) = loop {
            match shm_ipc::fdpass::recv_with_fds(self.sock.as_fd(), buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.map_err(ChannelError::Io)?,
            }
        };
        if n == 0 {
            return Err(ChannelError::Closed);
        }
        Ok((n, fds))
    }
}

/// How long a receiver waits for the continuation packets of a message
/// (the peer sends them right after it).
const CONTINUATION_WAIT: Duration = Duration::from_secs(5);

/// Sends one raw frame. Used by the crash handler path too, which
/// pre-encodes its frames.
pub(crate) fn send_frame(
    sock: BorrowedFd<'_>,
    frame: &[u8],
    fds: &[BorrowedFd<'_>],
) -> Result<(), ChannelError> {
    loop {
        match shm_ipc::fdpass::send_with_fds(sock, frame, fds) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.raw_os_error() == Some(libc::EPIPE)
                    || e.raw_os_error() == Some(libc::ECONNRESET) =>
            {
                return Err(ChannelError::Closed)
            }
            Err(e) => return Err(ChannelError::Io(e)),
            Ok(_) => return Ok(()),
        }
    }
}

/// Waits until `fd` is readable (or hung up). `false` on timeout.
pub(crate) fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> Result<bool, ChannelError> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let ms = PollTimeout::try_from(left.as_millis().min(i32::MAX as u128) as i32)
            .unwrap_or(PollTimeout::MAX);
        let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
        match poll(&mut fds, ms) {
            Ok(0) if left.is_zero() => return Ok(false),
            Ok(0) => continue,
            Ok(_) => return Ok(true),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(ChannelError::Io(e.into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn corrupt_frames_are_typed_errors() {
        let mut f = samples_from()[2].encode();
        assert_eq!(FromWorker::decode(&f[..5]), Err(DecodeError::Truncated));
        f[0] = b'X';
        assert_eq!(FromWorker::decode(&f), Err(DecodeError::BadMagic));
        let mut f = samples_from()[1].encode();
        f[12] = 99;
        assert!(matches!(
            FromWorker::decode(&f),
            Err(DecodeError::InvalidValue { field: "state", .. })
        ));
        let mut f = samples_to()[1].encode();
        f.push(0);
        assert_eq!(ToWorker::decode(&f), Err(DecodeError::Trailing));
    }

    #[test]
    fn channel_carries_frames_and_descriptors() {
        let (a, b) = socket_pair().unwrap();
        let parent = ParentChannel::new(a);
        let worker = WorkerChannel::new(b);
        let (r, w) = nix::unistd::pipe().unwrap();
        parent
            .send(&samples_to()[0], &[r.as_fd(), w.as_fd(), r.as_fd()])
            .unwrap();
        let (msg, fds) = worker.recv_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(msg, samples_to()[0]);
        assert_eq!(fds.len(), 3);
        assert!(matches!(
            parent.recv_timeout(Some(Duration::from_millis(10))),
            Err(ChannelError::Timeout)
        ));
        drop(worker);
        assert!(matches!(parent.recv(), Err(ChannelError::Closed)));
    }

    #[test]
    fn any_number_of_descriptors_arrive_and_a_short_list_is_an_error() {
        let (a, b) = socket_pair().unwrap();
        let parent = ParentChannel::new(a);
        let worker = WorkerChannel::new(b);
        let (r, _w) = nix::unistd::pipe().unwrap();
        let grants: Vec<Grant> = (0..50)
            .map(|i| Grant {
                kind: GrantKind::Import,
                name: format!("s{i}"),
            })
            .collect();
        let msg = ToWorker::Attach(grants.clone());
        let n = msg.fd_count();
        assert!(n > 3 * FDS_PER_PACKET, "{n}");
        let fds = vec![r.as_fd(); n];
        parent.send(&msg, &fds).unwrap();
        let (got, fds) = worker.recv_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(got, msg);
        assert_eq!(fds.len(), n);
        // A message whose descriptors do not all arrive (a peer that sends
        // the first packet only) is a typed error naming the counts.
        send_frame(parent.fd(), &msg.encode(), &[r.as_fd(); FDS_PER_PACKET]).unwrap();
        send_frame(
            parent.fd(),
            &ToWorker::Stop {
                deadline: Duration::ZERO,
            }
            .encode(),
            &[],
        )
        .unwrap();
        match worker.recv() {
            Err(ChannelError::Descriptors { expected, arrived }) => {
                assert_eq!((expected, arrived), (n, FDS_PER_PACKET));
            }
            other => panic!("{other:?}"),
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
