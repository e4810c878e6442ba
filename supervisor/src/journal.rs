//! Logging to the systemd journal.
//!
//! `[logging] format` chooses: `plain` (timestamps, level names, as on a
//! terminal), `journal`, or `auto` (the default: `journal` when stderr is
//! the journal, i.e. `$JOURNAL_STREAM` names stderr's device and inode, as
//! systemd sets it for `StandardError=journal`).
//!
//! In journal mode:
//! - emberd's own lines carry a `<N>` syslog priority prefix (error 3,
//!   warn 4, info 6, debug and trace 7), which journald turns into
//!   `PRIORITY=`, and no timestamp or colours (journald records both);
//! - each module line is also sent to journald's native socket
//!   (`[logging] journal_socket`, default `/run/systemd/journal/socket`) as
//!   a datagram with `MESSAGE=`, `PRIORITY=`, `SYSLOG_IDENTIFIER=` (the
//!   module's name), `EMBER_MODULE=`, `EMBER_REPLICA=`, `EMBER_VERSION=`
//!   and `EMBER_PID=` (the worker's): `journalctl -u emberd
//!   EMBER_MODULE=greeter -p warning` filters by module and priority. The
//!   module's log file in the state directory (`emberctl logs`) gets every
//!   line as before. The SDK's `tracing` records carry their level; the
//!   worker's raw stdout and stderr become two pipes emberd reads line by
//!   line (a line may start with its own `<N>`, else it is info, 6, for
//!   stdout and stderr alike, as journald's stream default `SyslogLevel=`).
//!   One thread (`ember-journal`) reads every instance's pipes, never the
//!   runtime: a module that prints in a tight loop does not slow the
//!   control socket. It writes the log file a batch of whole lines at a
//!   time, and sends at most [`RATE_LIMIT`] entries per module per
//!   [`RATE_INTERVAL`]; the count of the lines beyond is sent once per
//!   interval (`journal rate limit: N lines of module M not sent…`,
//!   priority 4, `EMBER_JOURNAL_DROPPED=N`).
//!
//! The socket is non-blocking: a journald that does not keep up loses
//! module lines (they are still in the log file) rather than stall emberd.
//! In plain mode nothing here runs: the worker's stdout and stderr are its
//! log file, as they always were.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::fd::{AsFd as _, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::eventfd::{EfdFlags, EventFd};

use serde::Deserialize;

/// journald's native protocol socket.
pub const DEFAULT_SOCKET: &str = "/run/systemd/journal/socket";

/// The longest line forwarded in one piece; longer ones are split.
pub const MAX_LINE: usize = 48 * 1024;

/// How emberd formats its log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `journal` when stderr is the journal, else `plain`.
    #[default]
    Auto,
    /// Priority prefixes, and module lines sent to the journal.
    Journal,
    /// Timestamped lines; module output only in the module's log file.
    Plain,
}

/// The `[logging]` section.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// `auto`, `journal` or `plain`.
    pub format: LogFormat,
    /// journald's native socket (a datagram socket), for module lines.
    pub journal_socket: PathBuf,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Auto,
            journal_socket: PathBuf::from(DEFAULT_SOCKET),
        }
    }
}

impl LoggingConfig {
    /// Whether emberd logs in journal mode.
    pub fn journal_mode(&self) -> bool {
        match self.format {
            LogFormat::Journal => true,
            LogFormat::Plain => false,
            LogFormat::Auto => stderr_is_journal(),
        }
    }
}

/// Whether stderr is connected to the journal: `$JOURNAL_STREAM` is
/// `DEVICE:INODE` of the stream systemd connected, compared with stderr's.
pub fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    let stderr = std::io::stderr();
    let Ok(fd) = std::os::fd::AsFd::as_fd(&stderr).try_clone_to_owned() else {
        return false;
    };
    std::fs::File::from(fd)
        .metadata()
        .is_ok_and(|m| m.dev() == dev && m.ino() == ino)
}

/// The syslog priority of a `tracing` level.
pub fn priority(level: tracing::Level) -> u8 {
    match level {
        tracing::Level::ERROR => 3,
        tracing::Level::WARN => 4,
        tracing::Level::INFO => 6,
        tracing::Level::DEBUG | tracing::Level::TRACE => 7,
    }
}

/// Sets up emberd's `tracing` output on stderr: in journal mode with `<N>`
/// prefixes and neither timestamps nor colours, else plain (colours only on
/// a terminal). `EMBER_LOG` filters (default `info`).
pub fn init_tracing(journal: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EMBER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if journal {
        builder
            .with_ansi(false)
            .event_format(Prefixed(
                tracing_subscriber::fmt::format()
                    .without_time()
                    .with_level(false),
            ))
            .init();
    } else {
        // Colours only for a terminal: in a log file they are noise.
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

/// A line format with the record's syslog priority in front.
struct Prefixed<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for Prefixed<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        self.0.format_event(ctx, writer, event)
    }
}

/// Most journal entries one module (all its replicas) sends per
/// [`RATE_INTERVAL`]; the lines beyond are only in its log file, and their
/// count is reported once per interval as a journal entry of its own.
pub const RATE_LIMIT: u32 = 1000;

/// The window [`RATE_LIMIT`] counts over.
pub const RATE_INTERVAL: Duration = Duration::from_secs(1);

/// Where module lines go in journal mode.
#[derive(Debug)]
pub struct Journal {
    socket: UnixDatagram,
    path: PathBuf,
    /// Lines journald did not take (full, gone).
    lost: AtomicU64,
    /// Whether the first loss was logged.
    warned: AtomicBool,
    /// Per module: its current rate window.
    windows: Mutex<HashMap<String, Window>>,
    /// The thread that reads every instance's stdout and stderr, started
    /// with the first instance (never before: emberd forks its zygote
    /// single-threaded).
    forwarder: Mutex<Option<Arc<Forwarder>>>,
}

/// One module's rate window.
#[derive(Debug)]
struct Window {
    start: Instant,
    sent: u32,
    dropped: u64,
}

static JOURNAL: OnceLock<Arc<Journal>> = OnceLock::new();

/// Turns journal forwarding of module lines on (once, at start-up).
pub fn install(path: &Path) -> std::io::Result<()> {
    let _ = JOURNAL.set(Arc::new(Journal::new(path)?));
    Ok(())
}

/// The journal module lines go to, in journal mode.
pub fn get() -> Option<Arc<Journal>> {
    JOURNAL.get().cloned()
}

/// Appends one field in journald's native format: `KEY=value\n`, or, for
/// a value with a newline, `KEY\n`, its length as 64-bit little endian,
/// the value and `\n`.
fn push_field(buf: &mut Vec<u8>, key: &str, value: &[u8]) {
    buf.extend_from_slice(key.as_bytes());
    if value.contains(&b'\n') {
        buf.push(b'\n');
        buf.extend_from_slice(&(value.len() as u64).to_le_bytes());
    } else {
        buf.push(b'=');
    }
    buf.extend_from_slice(value);
    buf.push(b'\n');
}

impl Journal {
    /// Sends to journald's native socket at `path` (non-blocking).
    pub fn new(path: &Path) -> std::io::Result<Self> {
        let socket = UnixDatagram::unbound()?;
        socket.set_nonblocking(true)?;
        Ok(Self {
            socket,
            path: path.to_owned(),
            lost: AtomicU64::new(0),
            warned: AtomicBool::new(false),
            windows: Mutex::default(),
            forwarder: Mutex::new(None),
        })
    }

    /// Sends one entry; a loss is counted (and the first one logged).
    pub fn send(&self, fields: &[(&str, &[u8])]) {
        let mut buf = Vec::with_capacity(256);
        for (k, v) in fields {
            push_field(&mut buf, k, v);
        }
        if let Err(e) = self.socket.send_to(&buf, &self.path) {
            self.lost.fetch_add(1, Ordering::Relaxed);
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    socket = %self.path.display(),
                    error = %e,
                    "cannot send module lines to the journal (they stay in the module's log file)"
                );
            }
        }
    }

    /// Module lines journald did not take.
    pub fn lost(&self) -> u64 {
        self.lost.load(Ordering::Relaxed)
    }

    /// Whether `module` may send one more line now; a window that ended
    /// with lines dropped is reported first.
    fn admit(&self, module: &str, now: Instant) -> bool {
        let (ok, report) = {
            let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            let w = match w.get_mut(module) {
                Some(w) => w,
                None => w.entry(module.to_owned()).or_insert(Window {
                    start: now,
                    sent: 0,
                    dropped: 0,
                }),
            };
            let mut report = None;
            if now.duration_since(w.start) >= RATE_INTERVAL {
                report = (w.dropped > 0).then_some(w.dropped);
                *w = Window {
                    start: now,
                    sent: 0,
                    dropped: 0,
                };
            }
            if w.sent < RATE_LIMIT {
                w.sent += 1;
                (true, report)
            } else {
                w.dropped += 1;
                (false, report)
            }
        };
        if let Some(n) = report {
            self.report_dropped(module, n);
        }
        ok
    }

    /// Reports the windows that ended with lines dropped, and forgets the
    /// quiet ones (a module uninstalled leaves nothing behind).
    fn sweep(&self, now: Instant) {
        let reports: Vec<(String, u64)> = {
            let mut w = self.windows.lock().unwrap_or_else(|e| e.into_inner());
            let mut reports = Vec::new();
            w.retain(|module, w| {
                if now.duration_since(w.start) < RATE_INTERVAL {
                    return true;
                }
                if w.dropped > 0 {
                    reports.push((module.clone(), w.dropped));
                }
                false
            });
            reports
        };
        for (module, n) in reports {
            self.report_dropped(&module, n);
        }
    }

    fn report_dropped(&self, module: &str, n: u64) {
        let message = format!(
            "journal rate limit: {n} lines of module {module} not sent to the journal \
             (more than {RATE_LIMIT} in {} s; every line is in its log file)",
            RATE_INTERVAL.as_secs()
        );
        self.send(&[
            ("MESSAGE", message.as_bytes()),
            ("PRIORITY", b"4"),
            ("SYSLOG_IDENTIFIER", module.as_bytes()),
            ("EMBER_MODULE", module.as_bytes()),
            ("EMBER_JOURNAL_DROPPED", n.to_string().as_bytes()),
        ]);
    }

    /// The forwarder thread, started on first use (once: the lock is
    /// held while it starts).
    fn forwarder(self: &Arc<Self>) -> std::io::Result<Arc<Forwarder>> {
        let mut slot = self.forwarder.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = &*slot {
            return Ok(f.clone());
        }
        let f = Arc::new(Forwarder {
            new: Mutex::default(),
            wake: EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)?,
        });
        let (journal, thread) = (self.clone(), f.clone());
        std::thread::Builder::new()
            .name("ember-journal".into())
            .spawn(move || thread.run(&journal))?;
        *slot = Some(f.clone());
        Ok(f)
    }
}

/// One module instance's fields on its journal entries.
#[derive(Debug, Clone)]
pub struct ModuleJournal {
    journal: Arc<Journal>,
    module: String,
    version: String,
    replica: String,
    pid: String,
}

impl ModuleJournal {
    /// For the instance `identity` (`name@version#replica`) in worker `pid`.
    pub fn new(
        journal: Arc<Journal>,
        module: &str,
        identity: &str,
        replica: u32,
        pid: i32,
    ) -> Self {
        let version = identity
            .split_once('@')
            .map(|(_, v)| v.rsplit_once('#').map_or(v, |(v, _)| v))
            .unwrap_or_default();
        Self {
            journal,
            module: module.to_owned(),
            version: version.to_owned(),
            replica: replica.to_string(),
            pid: pid.to_string(),
        }
    }

    /// Sends one line at `priority` (0–7), unless the module is over its
    /// rate ([`RATE_LIMIT`]).
    pub fn send(&self, priority: u8, message: &str) {
        if self.journal.admit(&self.module, Instant::now()) {
            self.send_admitted(priority, message);
        }
    }

    fn send_admitted(&self, priority: u8, message: &str) {
        let p = [b'0' + priority.min(7)];
        self.journal.send(&[
            ("MESSAGE", message.as_bytes()),
            ("PRIORITY", &p),
            ("SYSLOG_IDENTIFIER", self.module.as_bytes()),
            ("EMBER_MODULE", self.module.as_bytes()),
            ("EMBER_VERSION", self.version.as_bytes()),
            ("EMBER_REPLICA", self.replica.as_bytes()),
            ("EMBER_PID", self.pid.as_bytes()),
        ]);
    }

    /// Pipes for the worker's stdout and stderr (the write ends, to grant).
    /// emberd's one forwarder thread (`ember-journal`, off the runtime)
    /// copies what it reads from them to `log` (whole lines, a batch per
    /// read) and each line to the journal. It lets go of a pipe when every
    /// write end is closed (the worker and whatever it started are gone).
    pub fn stdio_pipes(&self, log: &std::fs::File) -> std::io::Result<(OwnedFd, OwnedFd)> {
        let forwarder = self.journal.forwarder()?;
        let mut ends = Vec::new();
        let mut pipes = Vec::new();
        // One more handle on the log, shared by both pipes.
        let file = Arc::new(log.try_clone()?);
        for default in [STDOUT_PRIORITY, STDERR_PRIORITY] {
            let (rx, tx) =
                nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC | nix::fcntl::OFlag::O_NONBLOCK)?;
            // The write end blocks (the worker's stdout as usual).
            nix::fcntl::fcntl(
                &tx,
                nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
            )?;
            pipes.push(Pipe {
                fd: rx,
                file: file.clone(),
                journal: self.clone(),
                default,
                pending: Vec::new(),
            });
            ends.push(tx);
        }
        forwarder.add(pipes);
        let err = ends.pop().expect("two pipes");
        let out = ends.pop().expect("two pipes");
        Ok((out, err))
    }
}

/// The priority of a raw stdout line without its own `<N>`: info, as
/// journald's stream default (`SyslogLevel=info`).
pub const STDOUT_PRIORITY: u8 = 6;
/// The priority of a raw stderr line without its own `<N>`: info too, as
/// systemd gives a service's stderr; a module that means a warning or an
/// error says so with `<4>` or `<3>` (or a `tracing` record).
pub const STDERR_PRIORITY: u8 = 6;

/// A line's own `<N>` priority prefix (as `sd-daemon(3)` describes), and
/// the rest.
pub fn split_priority(line: &str) -> (Option<u8>, &str) {
    let b = line.as_bytes();
    if b.len() >= 3 && b[0] == b'<' && (b'0'..=b'7').contains(&b[1]) && b[2] == b'>' {
        (Some(b[1] - b'0'), &line[3..])
    } else {
        (None, line)
    }
}

/// The forwarder thread's inbox: pipes to take on, and the eventfd that
/// wakes it.
#[derive(Debug)]
struct Forwarder {
    new: Mutex<Vec<Pipe>>,
    wake: EventFd,
}

/// One worker's stdout or stderr.
#[derive(Debug)]
struct Pipe {
    fd: OwnedFd,
    file: Arc<std::fs::File>,
    journal: ModuleJournal,
    default: u8,
    /// The start of a line not yet ended.
    pending: Vec<u8>,
}

/// The most read from one pipe per turn (every pipe gets its turn).
const READ_CHUNK: usize = 64 * 1024;

impl Forwarder {
    fn add(&self, pipes: Vec<Pipe>) {
        self.new
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(pipes);
        let _ = self.wake.write(1);
    }

    /// Forever: poll every pipe (and the wake-up), copy what each has.
    fn run(&self, journal: &Journal) {
        let mut pipes: Vec<Pipe> = Vec::new();
        let mut buf = vec![0u8; READ_CHUNK];
        let mut last_sweep = Instant::now();
        loop {
            pipes.append(&mut self.new.lock().unwrap_or_else(|e| e.into_inner()));
            let ready: Vec<bool> = {
                let mut fds = Vec::with_capacity(pipes.len() + 1);
                fds.push(PollFd::new(self.wake.as_fd(), PollFlags::POLLIN));
                for p in &pipes {
                    fds.push(PollFd::new(p.fd.as_fd(), PollFlags::POLLIN));
                }
                match poll(&mut fds, PollTimeout::from(1000u16)) {
                    Ok(_) => {}
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => {
                        tracing::error!(error = %e, "journal forwarder: poll failed");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                }
                fds.iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect()
            };
            if ready[0] {
                let _ = self.wake.read();
            }
            let mut k = 0;
            pipes.retain_mut(|p| {
                k += 1;
                !ready[k] || p.turn(&mut buf)
            });
            let now = Instant::now();
            if now.duration_since(last_sweep) >= RATE_INTERVAL {
                journal.sweep(now);
                last_sweep = now;
            }
        }
    }
}

impl Pipe {
    /// Reads once and forwards; `false` at end of file.
    fn turn(&mut self, buf: &mut [u8]) -> bool {
        let n = match nix::unistd::read(&self.fd, buf) {
            Ok(n) => n,
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => return true,
            Err(_) => 0,
        };
        if n == 0 {
            // The last words, without their newline.
            if !self.pending.is_empty() {
                let _ = (&*self.file).write_all(&self.pending);
                emit(&self.journal, &self.pending, self.default);
            }
            return false;
        }
        self.pending.extend_from_slice(&buf[..n]);
        // Every whole line in one write (the file is O_APPEND: lines of
        // several instances never interleave within a line).
        if let Some(last) = self.pending.iter().rposition(|&b| b == b'\n') {
            let _ = (&*self.file).write_all(&self.pending[..=last]);
            for line in self.pending[..last].split(|&b| b == b'\n') {
                emit(&self.journal, line, self.default);
            }
            self.pending.drain(..=last);
        }
        if self.pending.len() >= MAX_LINE {
            let _ = (&*self.file).write_all(&self.pending);
            emit(&self.journal, &self.pending, self.default);
            self.pending.clear();
        }
        true
    }
}

fn emit(journal: &ModuleJournal, line: &[u8], default: u8) {
    if !journal.journal.admit(&journal.module, Instant::now()) {
        return;
    }
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    let (own, message) = split_priority(text);
    journal.send_admitted(own.unwrap_or(default), message);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_fields_and_priority_prefixes() {
        let mut b = Vec::new();
        push_field(&mut b, "MESSAGE", b"hi");
        push_field(&mut b, "MESSAGE", b"a\nb");
        let mut want = b"MESSAGE=hi\nMESSAGE\n".to_vec();
        want.extend_from_slice(&3u64.to_le_bytes());
        want.extend_from_slice(b"a\nb\n");
        assert_eq!(b, want);

        assert_eq!(split_priority("<4>careful"), (Some(4), "careful"));
        assert_eq!(split_priority("<8>no"), (None, "<8>no"));
        assert_eq!(split_priority("<4"), (None, "<4"));
        assert_eq!(split_priority("plain"), (None, "plain"));
        assert_eq!(priority(tracing::Level::WARN), 4);
        assert_eq!(priority(tracing::Level::TRACE), 7);
    }

    #[test]
    fn the_version_comes_from_the_identity() {
        let dir = std::env::temp_dir().join(format!("ember-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let j = Arc::new(Journal::new(&path).unwrap());
        ModuleJournal::new(j.clone(), "kv", "kv@1.2.0-rc.1#2", 2, 77).send(4, "full");
        let mut buf = [0u8; 512];
        let n = server.recv(&mut buf).unwrap();
        assert_eq!(
            std::str::from_utf8(&buf[..n]).unwrap(),
            "MESSAGE=full\nPRIORITY=4\nSYSLOG_IDENTIFIER=kv\nEMBER_MODULE=kv\n\
             EMBER_VERSION=1.2.0-rc.1\nEMBER_REPLICA=2\nEMBER_PID=77\n"
        );
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
        ModuleJournal::new(j.clone(), "kv", "kv@1.0.0#0", 0, 1).send(6, "lost");
        assert_eq!(j.lost(), 1);
    }

    #[test]
    fn a_module_over_its_rate_is_cut_and_the_cut_is_counted_once() {
        let dir = std::env::temp_dir().join(format!("ember-journal-rate-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server.set_nonblocking(true).unwrap();
        let j = Journal::new(&path).unwrap();
        let t0 = Instant::now();
        let sent = (0..RATE_LIMIT + 5).filter(|_| j.admit("kv", t0)).count();
        assert_eq!(sent, RATE_LIMIT as usize);
        // Another module has its own window.
        assert!(j.admit("other", t0));
        // The next window reports the 5 dropped lines once, then admits.
        assert!(j.admit("kv", t0 + RATE_INTERVAL));
        j.sweep(t0 + RATE_INTERVAL * 3);
        let mut buf = vec![0u8; 4096];
        let mut reports = Vec::new();
        while let Ok(n) = server.recv(&mut buf) {
            reports.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(reports.len(), 1, "{reports:#?}");
        assert!(
            reports[0].contains("EMBER_JOURNAL_DROPPED=5\n"),
            "{reports:#?}"
        );
        assert!(reports[0].contains("PRIORITY=4\n"), "{reports:#?}");
        assert!(j.windows.lock().unwrap().is_empty());
        drop(server);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
