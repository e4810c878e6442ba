//! systemd `Type=notify` support: `READY=1`, `STOPPING=1`, `STATUS=` and
//! watchdog pings sent as datagrams to `$NOTIFY_SOCKET`.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

/// A notification could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    /// `$NOTIFY_SOCKET` is not a usable address.
    #[error("NOTIFY_SOCKET {0:?} is not an absolute path or abstract name")]
    BadAddress(String),
    /// The datagram could not be sent.
    #[error("cannot notify the service manager")]
    Io(#[source] std::io::Error),
}

/// A connection to the service manager.
#[derive(Debug)]
pub struct Notifier {
    socket: UnixDatagram,
    addr: SocketAddr,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET` as [`take_env`] read it; `Ok(None)` when it
    /// was not set.
    pub fn from_env(env: &SystemdEnv) -> Result<Option<Self>, NotifyError> {
        match env.notify_socket.as_deref() {
            Some(s) if !s.is_empty() => Self::new(s).map(Some),
            _ => Ok(None),
        }
    }

    /// To a given address: a path, or `@name` for the abstract namespace.
    pub fn new(address: &str) -> Result<Self, NotifyError> {
        let addr = if let Some(name) = address.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes()).map_err(NotifyError::Io)?
        } else if address.starts_with('/') {
            SocketAddr::from_pathname(address).map_err(NotifyError::Io)?
        } else {
            return Err(NotifyError::BadAddress(address.to_owned()));
        };
        let socket = UnixDatagram::unbound().map_err(NotifyError::Io)?;
        Ok(Self { socket, addr })
    }

    /// Sends newline-separated `KEY=VALUE` assignments.
    pub fn notify(&self, state: &str) -> Result<(), NotifyError> {
        self.socket
            .send_to_addr(state.as_bytes(), &self.addr)
            .map(drop)
            .map_err(NotifyError::Io)
    }
}

/// What the service manager told emberd in its environment, read once.
#[derive(Debug, Default)]
pub struct SystemdEnv {
    /// `$NOTIFY_SOCKET`.
    pub notify_socket: Option<String>,
    /// `$WATCHDOG_USEC`.
    pub watchdog_usec: Option<String>,
    /// `$WATCHDOG_PID`.
    pub watchdog_pid: Option<String>,
}

/// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and removes
/// them and `JOURNAL_STREAM` (read before, by [`crate::journal`]) from the
/// environment: the zygote and the workers inherit none of them (a module
/// must not notify or feed systemd's watchdog in emberd's name). Must run
/// while the process is single-threaded (it changes the environment).
pub fn take_env() -> SystemdEnv {
    let var = |k| std::env::var(k).ok();
    let env = SystemdEnv {
        notify_socket: var("NOTIFY_SOCKET"),
        watchdog_usec: var("WATCHDOG_USEC"),
        watchdog_pid: var("WATCHDOG_PID"),
    };
    for k in [
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "JOURNAL_STREAM",
    ] {
        std::env::remove_var(k);
    }
    env
}

/// The watchdog interval asked by `$WATCHDOG_USEC`, if it is meant for
/// this process (`$WATCHDOG_PID` unset or ours).
pub fn watchdog_interval(env: &SystemdEnv) -> Option<Duration> {
    let usec: u64 = env.watchdog_usec.as_deref()?.parse().ok()?;
    if let Some(pid) = env.watchdog_pid.as_deref() {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_to_path_and_abstract() {
        let dir = std::env::temp_dir().join(format!("ember-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        let n = Notifier::new(path.to_str().unwrap()).unwrap();
        n.notify("READY=1\nSTATUS=ok").unwrap();
        let mut buf = [0u8; 64];
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=ok");
        std::fs::remove_dir_all(&dir).unwrap();

        use std::os::linux::net::SocketAddrExt;
        let name = format!("ember-notify-test-{}", std::process::id());
        let server =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        Notifier::new(&format!("@{name}"))
            .unwrap()
            .notify("WATCHDOG=1")
            .unwrap();
        let len = server.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");

        assert!(matches!(
            Notifier::new("relative"),
            Err(NotifyError::BadAddress(_))
        ));
    }
}
