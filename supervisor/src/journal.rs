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
//!   line (a line may start with its own `<N>`, else stdout is 6 and stderr
//!   3).
//!
//! The socket is non-blocking: a journald that does not keep up loses
//! module lines (they are still in the log file) rather than stall emberd.
//! In plain mode nothing here runs: the worker's stdout and stderr are its
//! log file, as they always were.

use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

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

/// Where module lines go in journal mode.
#[derive(Debug)]
pub struct Journal {
    socket: UnixDatagram,
    path: PathBuf,
    /// Lines journald did not take (full, gone).
    lost: AtomicU64,
    /// Whether the first loss was logged.
    warned: AtomicBool,
}

static JOURNAL: OnceLock<Arc<Journal>> = OnceLock::new();

/// Turns journal forwarding of module lines on (once, at start-up).
pub fn install(path: &Path) -> std::io::Result<()> {
    let socket = UnixDatagram::unbound()?;
    socket.set_nonblocking(true)?;
    let _ = JOURNAL.set(Arc::new(Journal {
        socket,
        path: path.to_owned(),
        lost: AtomicU64::new(0),
        warned: AtomicBool::new(false),
    }));
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

    /// Sends one line at `priority` (0–7).
    pub fn send(&self, priority: u8, message: &str) {
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

    /// Pipes for the worker's stdout and stderr (the write ends, to grant),
    /// and the tasks that copy each line read from them to `log` (untouched)
    /// and to the journal. The tasks end when every write end is closed
    /// (the worker and whatever it started are gone).
    pub fn stdio_pipes(&self, log: &std::fs::File) -> std::io::Result<(OwnedFd, OwnedFd)> {
        let mut ends = Vec::new();
        // One more handle on the log, shared by both forwarders.
        let file = Arc::new(log.try_clone()?);
        for default in [6, 3] {
            let (rx, tx) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
            let rx = tokio::net::unix::pipe::Receiver::from_owned_fd(rx)?;
            tokio::spawn(forward(rx, file.clone(), self.clone(), default));
            ends.push(tx);
        }
        let err = ends.pop().expect("two pipes");
        let out = ends.pop().expect("two pipes");
        Ok((out, err))
    }
}

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

/// Copies lines from a worker's pipe to its log file and the journal.
async fn forward(
    mut rx: tokio::net::unix::pipe::Receiver,
    file: Arc<std::fs::File>,
    journal: ModuleJournal,
    default: u8,
) {
    use tokio::io::AsyncReadExt;
    let mut file: &std::fs::File = &file;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match rx.read(&mut buf).await {
            Ok(0) | Err(_) => 0,
            Ok(n) => n,
        };
        if n == 0 {
            // The last words, without their newline.
            if !pending.is_empty() {
                let _ = file.write_all(&pending);
                emit(&journal, &pending, default);
            }
            return;
        }
        pending.extend_from_slice(&buf[..n]);
        // Whole lines, each written with one write (the file is O_APPEND:
        // lines of several instances never interleave within a line).
        let mut start = 0;
        while let Some(i) = pending[start..].iter().position(|&b| b == b'\n') {
            let line = &pending[start..start + i + 1];
            let _ = file.write_all(line);
            emit(&journal, &line[..line.len() - 1], default);
            start += i + 1;
        }
        pending.drain(..start);
        if pending.len() >= MAX_LINE {
            let _ = file.write_all(&pending);
            emit(&journal, &pending, default);
            pending.clear();
        }
    }
}

fn emit(journal: &ModuleJournal, line: &[u8], default: u8) {
    let text = String::from_utf8_lossy(line);
    let text = text.strip_suffix('\r').unwrap_or(&text);
    let (own, message) = split_priority(text);
    journal.send(own.unwrap_or(default), message);
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
        let j = Arc::new(Journal {
            socket: UnixDatagram::unbound().unwrap(),
            path: path.clone(),
            lost: AtomicU64::new(0),
            warned: AtomicBool::new(false),
        });
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
}
