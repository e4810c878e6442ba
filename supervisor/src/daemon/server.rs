//! The control socket: bind with the configured mode, check each peer's
//! credentials, decode Varlink calls, dispatch, reply.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::actor::{ActorMsg, Response};
use super::slots::{Slot, Slots};
use crate::control::{self, errors, Action, Decoded};
use crate::fscred::Credentials;
use crate::prom::ControlCalls;
use crate::varlink::{Call, ErrorReply, FrameDecoder, FrameError, Reply, MAX_MESSAGE};

/// Most connections served at once; beyond that the one idle the longest
/// is closed to make room (see `Slots`), or the new one if none is idle.
pub const MAX_CONNECTIONS: usize = 128;

/// The socket could not be bound.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// Another daemon answers on this path.
    #[error("socket {} is in use by another daemon", path.display())]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// A filesystem or socket call failed.
    #[error("{op} {}", path.display())]
    Io {
        /// What was being done.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Who may talk to the daemon.
#[derive(Debug, Clone)]
pub struct Access {
    /// Allowed uids besides root and the daemon's own.
    pub uids: Vec<u32>,
    /// Allowed groups: a peer whose primary or supplementary group is
    /// listed may connect.
    pub gids: Vec<u32>,
    /// The daemon's effective uid.
    pub own_uid: u32,
}

impl Access {
    /// Whether a peer with these credentials (uid, primary gid and
    /// supplementary groups) may use the socket.
    pub fn allows(&self, uid: u32, gid: u32, groups: &[u32]) -> bool {
        uid == 0
            || uid == self.own_uid
            || self.uids.contains(&uid)
            || self.gids.contains(&gid)
            || groups.iter().any(|g| self.gids.contains(g))
    }
}

/// Why a peer must be refused as one of emberd's own descendants (a worker
/// or a process a module started), or `None`. Fails closed: a peer whose
/// ancestry cannot be read (it exited, perhaps after handing its
/// connection to another process) is refused too.
fn refuse_descendant(pid: Option<i32>) -> Option<&'static str> {
    let Some(mut pid) = pid.filter(|&p| p > 0) else {
        return Some("the kernel did not record the peer's pid");
    };
    let me = std::process::id() as i32;
    // Deep enough for any real process tree; a longer chain is refused.
    for _ in 0..256 {
        if pid == me {
            return Some("it runs below emberd (a module or a process it started)");
        }
        if pid <= 1 {
            return None;
        }
        match parent_of(pid) {
            Some(p) => pid = p,
            None => return Some("its process ancestry cannot be read"),
        }
    }
    Some("its process ancestry is too deep to check")
}

/// The parent pid of `pid`, from `/proc/PID/stat` (world-readable, also
/// for a process that is not dumpable).
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat_ppid(&stat)
}

/// The ppid field of a `/proc/PID/stat` line: the second field after the
/// command, which ends at the last `)` (a command may contain one).
fn parse_stat_ppid(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// The peer's supplementary groups as the kernel recorded them at
/// `connect` (`SO_PEERGROUPS`, Linux 4.13+); else, on older kernels, the
/// `Groups:` line of `/proc/PID/status` of the peer's pid; empty if neither
/// tells (the peer then has its primary group's rights only).
fn peer_groups(stream: &UnixStream, pid: Option<i32>) -> Vec<u32> {
    so_peergroups(stream)
        .or_else(|| pid.and_then(proc_groups))
        .unwrap_or_default()
}

/// `SO_PEERGROUPS`; `None` if the kernel does not have it.
fn so_peergroups(stream: &UnixStream) -> Option<Vec<u32>> {
    use std::os::fd::AsRawFd;
    // SO_PEERGROUPS from asm-generic/socket.h (x86_64, aarch64, riscv).
    const SO_PEERGROUPS: libc::c_int = 59;
    const GID: usize = std::mem::size_of::<libc::gid_t>();
    let mut groups: Vec<libc::gid_t> = vec![0; 32];
    loop {
        let mut len = (groups.len() * GID) as libc::socklen_t;
        // SAFETY: `groups` is a live, writable buffer of `len` bytes; the
        // kernel writes at most `len` bytes and updates `len`; the fd is
        // borrowed from `stream` for the duration of the call.
        let rc = unsafe {
            libc::getsockopt(
                stream.as_raw_fd(),
                libc::SOL_SOCKET,
                SO_PEERGROUPS,
                groups.as_mut_ptr().cast(),
                &mut len,
            )
        };
        let needed = len as usize / GID;
        if rc == 0 {
            groups.truncate(needed);
            return Some(groups);
        }
        let grow = std::io::Error::last_os_error().raw_os_error() == Some(libc::ERANGE)
            && needed > groups.len();
        if !grow {
            return None;
        }
        groups.resize(needed, 0);
    }
}

/// The `Groups:` of `/proc/PID/status` (the process's groups now, not at
/// `connect`: the fallback only).
fn proc_groups(pid: i32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_groups(&status)
}

/// The `Groups:` line of a `/proc/PID/status` text.
fn parse_groups(status: &str) -> Option<Vec<u32>> {
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    line.split_whitespace().map(|g| g.parse().ok()).collect()
}

/// Binds the socket at `path` with `mode` (and owner, if given): bound
/// under a temporary name, given its mode and owner, then renamed into
/// place, so it is never reachable with looser permissions. Runs before
/// the runtime exists; [`serve`] registers the listener with it.
pub fn bind(
    path: &Path,
    mode: u32,
    uid: Option<u32>,
    gid: Option<u32>,
) -> Result<std::os::unix::net::UnixListener, BindError> {
    let io = |op, p: &Path| {
        let p = p.to_owned();
        move |source| BindError::Io {
            op,
            path: p,
            source,
        }
    };
    if let Some(dir) = path.parent() {
        if !dir.exists() {
            std::fs::create_dir_all(dir).map_err(io("create", dir))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                .map_err(io("chmod", dir))?;
        }
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindError::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(io("remove stale", path))?;
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(io("bind", &tmp))?;
    let finish = || -> Result<(), BindError> {
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
            .map_err(io("chmod", &tmp))?;
        if uid.is_some() || gid.is_some() {
            std::os::unix::fs::chown(&tmp, uid, gid).map_err(io("chown", &tmp))?;
        }
        std::fs::rename(&tmp, path).map_err(io("rename", path))
    };
    if let Err(e) = finish() {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    listener
        .set_nonblocking(true)
        .map_err(io("configure", path))?;
    Ok(listener)
}

/// Accepts connections forever; counts the calls answered in `calls`.
pub async fn serve(
    listener: std::os::unix::net::UnixListener,
    access: Arc<Access>,
    actor: mpsc::Sender<ActorMsg>,
    calls: Arc<ControlCalls>,
) {
    let listener = match UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot register the control socket");
            return;
        }
    };
    let slots = Slots::new(MAX_CONNECTIONS);
    loop {
        let (stream, slot) = slots
            .accept(
                || listener.accept(),
                "accept failed",
                "too many control connections, none idle; closing one",
            )
            .await;
        let access = access.clone();
        let actor = actor.clone();
        let calls = calls.clone();
        tokio::spawn(async move {
            // The peer as the kernel recorded it at `connect`.
            let Ok(cred) = stream.peer_cred() else {
                return;
            };
            // A module, or anything it started, never drives emberd (under
            // a non-root emberd it has emberd's own uid, which the allow
            // list admits). emberd is a child subreaper, so every process a
            // worker starts stays below it.
            if let Some(why) = refuse_descendant(cred.pid()) {
                tracing::warn!(pid = ?cred.pid(), why, "control peer refused");
                let e = ErrorReply::new(errors::PERMISSION_DENIED, json!({ "uid": cred.uid() }));
                let mut stream = stream;
                let _ =
                    tokio::time::timeout(WRITE_DEADLINE, stream.write_all(&e.to_reply().encode()))
                        .await;
                return;
            }
            let peer = Credentials {
                uid: cred.uid(),
                gid: cred.gid(),
                groups: peer_groups(&stream, cred.pid()),
            };
            Connection::new(stream, actor, slot, peer, calls)
                .run(&access)
                .await;
        });
    }
}

/// How long the rest of a call may take to arrive once its first byte has:
/// a client that sends part of a call and stalls (slow-loris) is answered
/// `ProtocolError` and closed.
pub const FRAME_DEADLINE: Duration = Duration::from_secs(5);

/// How long a reply may wait for the client to read it: a client that
/// sends calls and never reads the replies is closed.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// [`WRITE_DEADLINE`], unless `EMBER_TEST_WRITE_DEADLINE_MS` (for tests
/// only: a stalled reader dropped in a test's time, or never) says
/// otherwise.
fn write_deadline() -> Duration {
    static D: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *D.get_or_init(|| {
        std::env::var("EMBER_TEST_WRITE_DEADLINE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .map_or(WRITE_DEADLINE, Duration::from_millis)
    })
}

/// The send buffer of a connection following `Events`: a few dozen
/// events (the kernel doubles it). Beyond that a reader that does not read
/// falls behind in the event hub, which counts what it misses.
const EVENTS_SNDBUF: usize = 8 * 1024;

struct Connection {
    stream: UnixStream,
    actor: mpsc::Sender<ActorMsg>,
    decoder: FrameDecoder,
    slot: Slot,
    /// The peer's credentials: the allow list checks them, and `Install`
    /// and `Deploy` open the files they name with them.
    peer: Arc<Credentials>,
    /// Calls answered, for `/metrics`.
    calls: Arc<ControlCalls>,
    /// The connection must close once the current call returns: a write
    /// failed or timed out (a frame may be half sent), or a stream ended
    /// in a way that ends the connection.
    close: bool,
}

enum Flow {
    Continue,
    Close,
}

impl Connection {
    fn new(
        stream: UnixStream,
        actor: mpsc::Sender<ActorMsg>,
        slot: Slot,
        peer: Credentials,
        calls: Arc<ControlCalls>,
    ) -> Self {
        Self {
            stream,
            actor,
            decoder: FrameDecoder::new(MAX_MESSAGE),
            slot,
            peer: Arc::new(peer),
            calls,
            close: false,
        }
    }

    /// Writes one reply; on failure (or past the deadline, perhaps half
    /// written) the connection is marked to close.
    async fn write(&mut self, reply: &Reply) -> Result<(), std::io::Error> {
        let r = match tokio::time::timeout(write_deadline(), self.stream.write_all(&reply.encode()))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        };
        if r.is_err() {
            self.close = true;
        }
        r
    }

    /// Keeps `n` bytes the client sent during a stream (a pipelined call)
    /// unless that makes more than [`MAX_MESSAGE`] buffered: then `false`
    /// (the connection is to be closed).
    fn keep_input(&mut self, bytes: &[u8]) -> bool {
        if self.decoder.pending() + bytes.len() > MAX_MESSAGE {
            self.close = true;
            return false;
        }
        self.decoder.extend(bytes);
        true
    }

    async fn run(mut self, access: &Access) {
        let mut buf = vec![0u8; 16 * 1024];
        let peer = self.peer.clone();
        if !access.allows(peer.uid, peer.gid, &peer.groups) {
            tracing::warn!(uid = peer.uid, gid = peer.gid, "control peer refused");
            // Answer the first call (read with a short deadline, never
            // parsed) so the client sees the error rather than a reset.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.stream.read(&mut buf)).await;
            let e = ErrorReply::new(errors::PERMISSION_DENIED, json!({ "uid": peer.uid }));
            let _ = self.write(&e.to_reply()).await;
            let _ = self.stream.shutdown().await;
            return;
        }
        // When the call being received began to arrive.
        let mut partial_since: Option<Instant> = None;
        loop {
            let mut completed = false;
            loop {
                match self.decoder.next_frame() {
                    Ok(Some(frame)) => {
                        completed = true;
                        self.slot.set_idle(false);
                        if let Flow::Close = self.call(&frame).await {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e @ FrameError::TooLarge { .. }) => {
                        return self.protocol_error(e.to_string()).await;
                    }
                }
            }
            partial_since = match self.decoder.pending() {
                0 => None,
                _ if completed => Some(Instant::now()),
                _ => partial_since.or_else(|| Some(Instant::now())),
            };
            self.slot.set_idle(true);
            let evict = self.slot.evict.clone();
            let read = async {
                match partial_since {
                    Some(t) => tokio::time::timeout_at(
                        (t + FRAME_DEADLINE).into(),
                        self.stream.read(&mut buf),
                    )
                    .await
                    .ok(),
                    None => Some(self.stream.read(&mut buf).await),
                }
            };
            let read = tokio::select! {
                r = read => r,
                _ = evict.notified() => {
                    tracing::debug!("idle control connection closed to make room");
                    return;
                }
            };
            match read {
                None => {
                    let reason = format!(
                        "incomplete call: no terminator {} s after its first byte",
                        FRAME_DEADLINE.as_secs()
                    );
                    return self.protocol_error(reason).await;
                }
                Some(Ok(0) | Err(_)) => return,
                Some(Ok(n)) => self.decoder.extend(&buf[..n]),
            }
        }
    }

    async fn protocol_error(&mut self, reason: String) {
        let e = ErrorReply::new(errors::PROTOCOL_ERROR, json!({ "reason": reason }));
        let _ = self.write(&e.to_reply()).await;
        let _ = self.stream.shutdown().await;
    }

    async fn call(&mut self, frame: &[u8]) -> Flow {
        let Decoded { call, action } = match control::decode_call(frame) {
            Ok(d) => d,
            Err(e) => {
                self.protocol_error(crate::error_chain(&e)).await;
                return Flow::Close;
            }
        };
        let result = match action {
            Ok(action) => self.dispatch(&call, action).await,
            Err(e) => Err(e),
        };
        self.calls
            .record(&call.method, result.as_ref().err().map(|e| e.name));
        let reply = match result {
            Ok(Some(r)) => r,
            Ok(None) if self.close => return Flow::Close,
            Ok(None) => return Flow::Continue,
            Err(e) => e.to_reply(),
        };
        if call.oneway {
            return match self.close {
                true => Flow::Close,
                false => Flow::Continue,
            };
        }
        match self.write(&reply).await {
            Ok(()) if !self.close => Flow::Continue,
            _ => Flow::Close,
        }
    }

    /// `Ok(None)` when the reply was already streamed.
    async fn dispatch(&mut self, call: &Call, action: Action) -> Result<Option<Reply>, ErrorReply> {
        let request = match action {
            Action::Service(v) => return Ok(Some(Reply::ok(v))),
            Action::Supervisor(r) => r,
        };
        let logs = match &request {
            control::Request::Logs(l) => Some(l.clone()),
            _ => None,
        };
        let events = match &request {
            control::Request::Events(_) if !call.more || call.oneway => {
                return Err(control::invalid_input(
                    "Events streams its replies: call it with `more` (and not `oneway`)",
                ));
            }
            control::Request::Events(e) => Some(e.clone()),
            _ => None,
        };
        let (tx, rx) = oneshot::channel();
        let shutting_down = || ErrorReply::new(errors::SHUTTING_DOWN, json!({}));
        let follow = matches!(
            request,
            control::Request::Install(_)
                | control::Request::Deploy(_)
                | control::Request::Rollback(_)
                | control::Request::WaitContainer(_)
        ) && call.more
            && !call.oneway;
        let (progress, progress_rx) = match follow {
            true => {
                let (p, r) = tokio::sync::mpsc::unbounded_channel();
                (Some(p), Some(r))
            }
            false => (None, None),
        };
        self.actor
            .send(ActorMsg::Control {
                request,
                reply: tx,
                progress,
                peer: self.peer.clone(),
            })
            .await
            .map_err(|_| shutting_down())?;
        if let Some(progress_rx) = progress_rx {
            return self.progress(rx, progress_rx).await;
        }
        match rx.await.map_err(|_| shutting_down())?? {
            Response::Value(v) => Ok(Some(Reply::ok(v))),
            Response::Logs(path) => {
                let logs = logs.expect("logs response to a logs request");
                self.logs(&path, logs.lines(), call.more, call.oneway).await
            }
            Response::Events(sub) => {
                let filter = events.expect("events response to an events request");
                self.events(sub, &filter).await
            }
        }
    }

    /// `Events` with `more`: a first reply `{subscribed: true, last_seq,
    /// daemon}`, then one reply `{event}` per event, each with `continues`,
    /// until the client hangs up; the connection then closes (it serves no
    /// further call). While a reply is being written the connection keeps
    /// taking events from the hub into a queue of its own of up to the
    /// hub's capacity (`[events] buffer`, exactly): a subscriber further
    /// behind, or one whose reply has made no progress for the write
    /// deadline (a stalled reader), is dropped: the rest of the reply in
    /// flight and `EventsLagged {missed}` (the events it will not get) are
    /// sent if the socket takes them, and the connection is closed. emberd
    /// never waits for it. The socket's send buffer is kept small, so a
    /// stalled reader falls behind here, where it is counted, not in
    /// kernel buffers. Bytes the client sends meanwhile are discarded; more
    /// than [`MAX_MESSAGE`] of them closes the connection.
    async fn events(
        &mut self,
        sub: super::events::Subscription,
        filter: &control::events::Events,
    ) -> Result<Option<Reply>, ErrorReply> {
        use std::collections::VecDeque;
        use tokio::sync::broadcast::error::{RecvError, TryRecvError};
        // However the stream ends, the connection ends with it.
        self.close = true;
        let _ = nix::sys::socket::setsockopt(
            &self.stream,
            nix::sys::socket::sockopt::SndBuf,
            &EVENTS_SNDBUF,
        );
        let super::events::Subscription {
            mut rx,
            capacity,
            last_seq,
            daemon,
        } = sub;
        let deadline = write_deadline();
        let mut first = Reply::ok(json!({
            "subscribed": true, "last_seq": last_seq, "daemon": daemon
        }));
        first.continues = true;
        // The reply being written, and how much of it is sent.
        let mut out = first.encode();
        let mut sent = 0;
        let mut progress = Instant::now();
        let mut queue: VecDeque<Arc<super::events::Record>> = VecDeque::new();
        let mut input = 0usize;
        // Events still in the hub that the filter wants: also missed.
        let drain = |rx: &mut tokio::sync::broadcast::Receiver<Arc<super::events::Record>>| -> u64 {
            let mut n = 0;
            loop {
                match rx.try_recv() {
                    Ok(r) if filter.wants(r.event.module()) => n += 1,
                    Ok(_) => {}
                    Err(TryRecvError::Lagged(k)) => n += k,
                    Err(_) => return n,
                }
            }
        };
        let lagged =
            |missed: u64| ErrorReply::new(errors::EVENTS_LAGGED, json!({ "missed": missed }));
        let mut buf = [0u8; 4096];
        let (end, stalled) = {
            let (mut rd, mut wr) = self.stream.split();
            loop {
                if sent == out.len() {
                    out.clear();
                    sent = 0;
                    if let Some(record) = queue.pop_front() {
                        let v = serde_json::to_value(&*record).expect("events serialize");
                        let mut r = Reply::ok(json!({ "event": v }));
                        r.continues = true;
                        out = r.encode();
                        progress = Instant::now();
                    }
                }
                let writing = !out.is_empty();
                tokio::select! {
                    r = rd.read(&mut buf) => match r {
                        // The client hung up.
                        Ok(0) | Err(_) => return Ok(None),
                        Ok(n) => {
                            input += n;
                            if input > MAX_MESSAGE {
                                let e = ErrorReply::new(
                                    errors::PROTOCOL_ERROR,
                                    json!({ "reason": too_much_input() }),
                                );
                                break (Some(e), false);
                            }
                        }
                    },
                    ev = rx.recv() => match ev {
                        Ok(record) => {
                            if !filter.wants(record.event.module()) {
                                continue;
                            }
                            if queue.len() >= capacity {
                                let missed = 1 + drain(&mut rx);
                                break (Some(lagged(missed)), false);
                            }
                            queue.push_back(record);
                        }
                        Err(RecvError::Lagged(n)) => {
                            let missed = n + queue.len() as u64 + drain(&mut rx);
                            break (Some(lagged(missed)), false);
                        }
                        Err(RecvError::Closed) => {
                            break (Some(ErrorReply::new(errors::SHUTTING_DOWN, json!({}))), false);
                        }
                    },
                    w = wr.write(&out[sent..]), if writing => match w {
                        Ok(0) | Err(_) => return Ok(None),
                        Ok(n) => {
                            sent += n;
                            progress = Instant::now();
                        }
                    },
                    _ = tokio::time::sleep_until((progress + deadline).into()), if writing => {
                        let missed = queue.len() as u64 + drain(&mut rx);
                        break (Some(lagged(missed)), true);
                    }
                }
            }
        };
        if let Some(e) = end {
            if e.name == errors::EVENTS_LAGGED {
                tracing::warn!(missed = %e.parameters["missed"], stalled, "events subscriber fell behind; dropped");
            }
            // The rest of the reply in flight, then the error.
            let mut rest = out[sent..].to_vec();
            rest.extend_from_slice(&e.to_reply().encode());
            if stalled {
                // It read nothing for the whole deadline: what the socket
                // takes now, no more waiting.
                let _ = self.stream.try_write(&rest);
            } else {
                let _ = tokio::time::timeout(deadline, self.stream.write_all(&rest)).await;
            }
        }
        let _ = self.stream.shutdown().await;
        Ok(None)
    }

    /// `Install`, `Deploy` or `Rollback` with `more`: the module's summary
    /// each time it changes (an install: until its start settles; a
    /// rollout: each change of its phase or replica counts), as replies
    /// with `continues`, then the call's own reply (an install's once its
    /// state is on disk; a rollout's with its outcome). A call refused ends
    /// with its error at once.
    async fn progress(
        &mut self,
        mut done: oneshot::Receiver<Result<Response, ErrorReply>>,
        mut progress: tokio::sync::mpsc::UnboundedReceiver<serde_json::Value>,
    ) -> Result<Option<Reply>, ErrorReply> {
        let shutting_down = || ErrorReply::new(errors::SHUTTING_DOWN, json!({}));
        let mut result = None;
        let mut following = true;
        while following || result.is_none() {
            tokio::select! {
                p = progress.recv(), if following => match p {
                    Some(v) => {
                        let mut r = Reply::ok(v);
                        r.continues = true;
                        if self.write(&r).await.is_err() {
                            return Ok(None);
                        }
                    }
                    None => following = false,
                },
                r = &mut done, if result.is_none() => {
                    let r = r.map_err(|_| shutting_down())?;
                    match r {
                        Err(e) => return Err(e),
                        Ok(v) => result = Some(v),
                    }
                }
            }
        }
        match result {
            Some(Response::Value(v)) => Ok(Some(Reply::ok(v))),
            _ => Err(shutting_down()),
        }
    }

    async fn logs(
        &mut self,
        path: &Path,
        lines: usize,
        more: bool,
        oneway: bool,
    ) -> Result<Option<Reply>, ErrorReply> {
        let (tail, offset) = super::logs::tail(path, lines)
            .await
            .map_err(|e| control::invalid_input(format!("log {}: {e}", path.display())))?;
        let mut first = Reply::ok(json!({ "lines": tail }));
        if !more {
            return Ok(Some(first));
        }
        if oneway {
            return Ok(None);
        }
        first.continues = true;
        if self.write(&first).await.is_err() {
            return Ok(None);
        }
        let mut follow = super::logs::Follower::new(path, offset).await;
        let mut buf = [0u8; 4096];
        loop {
            tokio::select! {
                r = self.stream.read(&mut buf) => match r {
                    // The client hung up (or pipelined another call, kept
                    // for later).
                    Ok(0) | Err(_) => return Ok(None),
                    Ok(n) => if !self.keep_input(&buf[..n]) {
                        self.protocol_error(too_much_input()).await;
                        return Ok(None);
                    },
                },
                _ = tokio::time::sleep(super::logs::POLL) => {
                    use super::logs::Followed;
                    match follow.poll().await {
                        Ok(Followed::Lines(new)) if new.is_empty() => {}
                        Ok(Followed::Lines(new)) => {
                            let mut r = Reply::ok(json!({ "lines": new }));
                            r.continues = true;
                            if self.write(&r).await.is_err() {
                                return Ok(None);
                            }
                        }
                        // The module was uninstalled: its last lines, then
                        // the end of the stream.
                        Ok(Followed::Ended(last)) => {
                            return Ok(Some(Reply::ok(json!({ "lines": last }))))
                        }
                        Err(_) => return Ok(Some(Reply::ok(json!({ "lines": [] })))),
                    }
                }
            }
        }
    }
}

/// Why a connection that sent too much while it was streaming is closed.
fn too_much_input() -> String {
    format!("more than {MAX_MESSAGE} bytes sent while a stream was being answered")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descendant_is_refused_and_a_stranger_is_not() {
        assert_eq!(parse_stat_ppid("42 (a) b) S 7 42 42 0"), Some(7));
        assert_eq!(parse_stat_ppid("garbage"), None);
        // A real child of this process is below it.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let refused = refuse_descendant(Some(child.id() as i32));
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            refused.is_some_and(|w| w.contains("below emberd")),
            "{refused:?}"
        );
        // Our parent is not (and its ancestry reaches pid 1).
        assert_eq!(
            refuse_descendant(Some(nix::unistd::getppid().as_raw())),
            None
        );
        // No pid, or one that is gone: refused.
        assert!(refuse_descendant(None).is_some());
        let gone = child.id() as i32;
        assert!(refuse_descendant(Some(gone)).is_some());
    }

    #[test]
    fn groups_from_proc_status() {
        let status = "Name:\temberctl\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 27 1000 \n";
        assert_eq!(parse_groups(status), Some(vec![4, 27, 1000]));
        assert_eq!(parse_groups("Groups:\t\n"), Some(vec![]));
        assert_eq!(parse_groups("Name:\tx\n"), None);
        // Our own, as the kernel has them.
        let own = proc_groups(std::process::id() as i32).unwrap();
        let mut expected: Vec<u32> = nix::unistd::getgroups()
            .unwrap()
            .iter()
            .map(|g| g.as_raw())
            .collect();
        let mut own_sorted = own.clone();
        own_sorted.sort_unstable();
        expected.sort_unstable();
        assert_eq!(own_sorted, expected);
    }
}
