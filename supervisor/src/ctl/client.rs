//! A small blocking Varlink client.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use super::ExitCode;
use crate::control::errors;
use crate::varlink::{Call, FrameDecoder, Reply, MAX_REPLY};

/// How long a single reply may take (uninstall waits for the stop).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// Error names of the releases interface (`Deploy`, `Rollback`, `History`,
/// `Rollout`) that `crate::control::errors` does not declare yet.
pub mod release_errors {
    /// A rollout of the module is in progress.
    pub const ROLLOUT_IN_PROGRESS: &str = "io.ember.Supervisor.RolloutInProgress";
    /// No revision of that number in the module's history.
    pub const REVISION_NOT_FOUND: &str = "io.ember.Supervisor.RevisionNotFound";
    /// The module has no rollout to act on.
    pub const NO_ROLLOUT: &str = "io.ember.Supervisor.NoRollout";
}

use release_errors::{NO_ROLLOUT, REVISION_NOT_FOUND, ROLLOUT_IN_PROGRESS};

/// A call failed.
#[derive(Debug, thiserror::Error)]
pub enum CtlError {
    /// Nothing answers on the socket.
    #[error("cannot reach emberd at {}", path.display())]
    Unreachable {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The socket exists but this user may not connect to it (the socket
    /// file's mode or owner, or a directory on its path without search
    /// permission): `EACCES`/`EPERM` from `connect`.
    #[error("permission denied connecting to emberd at {}", path.display())]
    AccessDenied {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The connection broke or timed out.
    #[error("connection to emberd failed")]
    Io(#[source] std::io::Error),
    /// The daemon's bytes are not a Varlink reply.
    #[error("malformed reply from emberd")]
    Protocol,
    /// The daemon answered with a Varlink error.
    #[error("{}", describe(name, parameters))]
    Remote {
        /// Error name.
        name: String,
        /// Its parameters.
        parameters: Value,
    },
    /// A local argument is unusable.
    #[error("{0}")]
    Input(String),
    /// `install --wait`: the module was installed but did not start.
    #[error("{0}")]
    NotRunning(String),
    /// `deploy`/`rollback`: the rollout was aborted or rolled back.
    #[error("{0}")]
    Rollout(String),
    /// Stdout cannot be written (other than its reader having gone, which
    /// only stops the printing).
    #[error("cannot write to stdout")]
    Output(#[source] std::io::Error),
    /// Stdout's reader has gone while a verb that prints until stopped
    /// (`logs -f`) ran: the command ends quietly, with success.
    #[error("stdout closed")]
    StdoutClosed,
}

fn describe(name: &str, p: &Value) -> String {
    let short = name.rsplit('.').next().unwrap_or(name);
    let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("?").to_owned();
    let n = |k: &str| {
        p.get(k)
            .filter(|v| v.is_number())
            .map_or("?".into(), Value::to_string)
    };
    match name {
        errors::MODULE_NOT_FOUND => format!("module {} not found", s("name")),
        errors::ALREADY_INSTALLED => format!(
            "{} {} is already installed; to ship a new version use `emberctl deploy PATH`",
            s("name"),
            s("version")
        ),
        ROLLOUT_IN_PROGRESS => format!(
            "{name} has a rollout to revision {} in progress ({}); wait for it, or abort it \
             with `emberctl rollout abort {name}`",
            n("revision"),
            s("phase"),
            name = s("name"),
        ),
        REVISION_NOT_FOUND => format!(
            "{name} has no revision {} (see `emberctl history {name}`)",
            n("revision"),
            name = s("name"),
        ),
        NO_ROLLOUT => format!("{} has no rollout in progress", s("name")),
        errors::EVENTS_LAGGED => format!(
            "dropped by emberd: this reader fell behind and missed {} events",
            n("missed")
        ),
        // The reason names the file, the field and the line.
        errors::INVALID_MANIFEST => s("reason"),
        errors::INVALID_INPUT => format!("invalid input: {}", s("reason")),
        errors::INSTALL_FAILED => format!("install of {} failed: {}", s("name"), s("reason")),
        errors::PORT_IN_USE => format!(
            "port {} is in use",
            p.get("port").cloned().unwrap_or_default()
        ),
        errors::PERMISSION_DENIED => "permission denied by emberd".into(),
        errors::PROTOCOL_ERROR => format!("protocol error: {}", s("reason")),
        _ if p.as_object().is_some_and(|o| !o.is_empty()) => format!("{short}: {p}"),
        _ => short.to_owned(),
    }
}

impl CtlError {
    /// The exit code for this failure.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            CtlError::Unreachable { .. } => ExitCode::Unreachable,
            CtlError::AccessDenied { .. } => ExitCode::PermissionDenied,
            CtlError::Io(_) => ExitCode::Failure,
            CtlError::Protocol => ExitCode::Protocol,
            CtlError::Input(_) => ExitCode::InvalidInput,
            CtlError::NotRunning(_) | CtlError::Rollout(_) | CtlError::Output(_) => {
                ExitCode::Failure
            }
            CtlError::StdoutClosed => ExitCode::Ok,
            CtlError::Remote { name, .. } => match name.as_str() {
                errors::MODULE_NOT_FOUND | REVISION_NOT_FOUND => ExitCode::NotFound,
                // The module exists: 3 would say it does not.
                errors::INVALID_INPUT
                | errors::INVALID_MANIFEST
                | NO_ROLLOUT
                | "org.varlink.service.InvalidParameter" => ExitCode::InvalidInput,
                errors::ALREADY_INSTALLED
                | errors::PORT_IN_USE
                | ROLLOUT_IN_PROGRESS
                | errors::CONFLICT => ExitCode::Conflict,
                errors::PERMISSION_DENIED => ExitCode::PermissionDenied,
                errors::PROTOCOL_ERROR => ExitCode::Protocol,
                _ => ExitCode::Failure,
            },
        }
    }
}

/// A connection to emberd.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    decoder: FrameDecoder,
}

impl Client {
    /// Connects to the socket.
    pub fn connect(path: &Path) -> Result<Self, CtlError> {
        let stream = UnixStream::connect(path).map_err(|source| {
            let path = path.to_owned();
            // A daemon may well be listening: it is the file system that
            // refuses, like the allow list would.
            if source.kind() == std::io::ErrorKind::PermissionDenied {
                CtlError::AccessDenied { path, source }
            } else {
                CtlError::Unreachable { path, source }
            }
        })?;
        Ok(Self {
            stream,
            decoder: FrameDecoder::new(MAX_REPLY),
        })
    }

    fn send(&mut self, call: &Call) -> Result<(), CtlError> {
        match self.stream.write_all(&call.encode()) {
            Ok(()) => Ok(()),
            // The daemon may have answered (e.g. PermissionDenied) and
            // closed before reading: prefer its answer to the write error.
            Err(e) => match self.next_reply(Some(Duration::from_secs(1))) {
                Ok(r) => Self::check(r).map(drop).and(Err(CtlError::Io(e))),
                Err(_) => Err(CtlError::Io(e)),
            },
        }
    }

    fn next_reply(&mut self, timeout: Option<Duration>) -> Result<Reply, CtlError> {
        self.stream
            .set_read_timeout(timeout)
            .map_err(CtlError::Io)?;
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.decoder.next_frame() {
                Ok(Some(frame)) => return Reply::parse(&frame).map_err(|_| CtlError::Protocol),
                Ok(None) => {}
                Err(_) => return Err(CtlError::Protocol),
            }
            let n = match self.stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(CtlError::Io(e)),
            };
            if n == 0 {
                return Err(CtlError::Io(std::io::ErrorKind::UnexpectedEof.into()));
            }
            self.decoder.extend(&buf[..n]);
        }
    }

    fn check(reply: Reply) -> Result<Reply, CtlError> {
        match reply.error {
            Some(name) => Err(CtlError::Remote {
                name,
                parameters: Value::Object(reply.parameters),
            }),
            None => Ok(reply),
        }
    }

    /// One call, one reply.
    pub fn call(&mut self, method: &str, parameters: Value) -> Result<Value, CtlError> {
        self.send(&Call::new(method, parameters))?;
        let r = Self::check(self.next_reply(Some(REPLY_TIMEOUT))?)?;
        Ok(Value::Object(r.parameters))
    }

    /// Starts a call with `more` whose replies are then read one at a time
    /// with [`Client::next_more`]; returns the first.
    pub fn start_more(&mut self, method: &str, parameters: Value) -> Result<Value, CtlError> {
        let mut call = Call::new(method, parameters);
        call.more = true;
        self.send(&call)?;
        let r = Self::check(self.next_reply(Some(REPLY_TIMEOUT))?)?;
        Ok(Value::Object(r.parameters))
    }

    /// The next reply of a call started with [`Client::start_more`]: `None`
    /// if none came within `timeout` (`None`: wait as long as it takes);
    /// the error the stream ended with, if it did.
    pub fn next_more(&mut self, timeout: Option<Duration>) -> Result<Option<Value>, CtlError> {
        match self.next_reply(timeout) {
            Ok(r) => Self::check(r).map(|r| Some(Value::Object(r.parameters))),
            Err(CtlError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    /// A call with `more`: `each` sees every reply until the last, and
    /// whether more follow (`continues`).
    pub fn call_more(
        &mut self,
        method: &str,
        parameters: Value,
        mut each: impl FnMut(Value, bool) -> Result<(), CtlError>,
    ) -> Result<(), CtlError> {
        let mut call = Call::new(method, parameters);
        call.more = true;
        self.send(&call)?;
        let mut first = true;
        loop {
            let timeout = first.then_some(REPLY_TIMEOUT);
            first = false;
            let r = Self::check(self.next_reply(timeout)?)?;
            let go_on = r.continues;
            each(Value::Object(r.parameters), go_on)?;
            if !go_on {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn remote(name: &str, parameters: Value) -> CtlError {
        CtlError::Remote {
            name: name.into(),
            parameters,
        }
    }

    #[test]
    fn release_errors() {
        let e = remote(
            errors::ALREADY_INSTALLED,
            json!({ "name": "greeter", "version": "0.1.0" }),
        );
        assert_eq!(
            e.to_string(),
            "greeter 0.1.0 is already installed; to ship a new version use `emberctl deploy PATH`"
        );
        assert_eq!(e.exit_code(), ExitCode::Conflict);

        let e = remote(
            ROLLOUT_IN_PROGRESS,
            json!({ "name": "greeter", "revision": 3, "phase": "paused" }),
        );
        assert_eq!(
            e.to_string(),
            "greeter has a rollout to revision 3 in progress (paused); wait for it, or abort it \
             with `emberctl rollout abort greeter`"
        );
        assert_eq!(e.exit_code(), ExitCode::Conflict);

        let e = remote(
            REVISION_NOT_FOUND,
            json!({ "name": "greeter", "revision": 7 }),
        );
        assert_eq!(
            e.to_string(),
            "greeter has no revision 7 (see `emberctl history greeter`)"
        );
        assert_eq!(e.exit_code(), ExitCode::NotFound);

        let e = remote(NO_ROLLOUT, json!({ "name": "greeter" }));
        assert_eq!(e.to_string(), "greeter has no rollout in progress");
        assert_eq!(e.exit_code(), ExitCode::InvalidInput);

        let e = CtlError::Rollout("greeter: revision 3 rolled back".into());
        assert_eq!(e.exit_code(), ExitCode::Failure);
    }
}
