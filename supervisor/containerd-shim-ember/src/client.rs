//! A small Varlink client for emberd's control socket: JSON messages ended by
//! a NUL byte, the `io.ember.Supervisor` container methods only.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The socket emberd listens on when `$EMBER_SOCKET` is not set.
pub const DEFAULT_SOCKET: &str = "/run/ember/control.sock";

const INTERFACE: &str = "io.ember.Supervisor";

/// How long connecting to emberd may take (a socket whose listen backlog is
/// full, an emberd that stopped accepting).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long emberd may take to answer a call (and to take its bytes), but
/// `RunContainer` ([`RUN_TIMEOUT`]) and `WaitContainer` (no limit: it
/// waits for the exit, and sees emberd's end as the connection closing).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// How long `RunContainer` may take: reading the image's files and the
/// module's start until it is ready (its start deadline), with room; the
/// kubelet's own CRI request timeout is 2 minutes.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The emberd control socket: `$EMBER_SOCKET`, else [`DEFAULT_SOCKET`].
pub fn socket_from_env() -> PathBuf {
    match std::env::var_os("EMBER_SOCKET") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(DEFAULT_SOCKET),
    }
}

/// What went wrong talking to emberd.
#[derive(Debug)]
pub enum ClientError {
    /// emberd's socket could not be reached.
    Connect { socket: PathBuf, err: io::Error },
    /// emberd did not answer `method` within `after`.
    Timeout {
        socket: PathBuf,
        method: String,
        after: Duration,
    },
    /// The connection broke or emberd closed it mid-call.
    Io { socket: PathBuf, err: io::Error },
    /// emberd answered something that is not a Varlink reply.
    Protocol { socket: PathBuf, reason: String },
    /// emberd answered with a Varlink error.
    Remote {
        name: String,
        parameters: Map<String, Value>,
    },
}

impl ClientError {
    /// The short error name (`ModuleNotFound`, `Conflict`, ...) of a remote error.
    pub fn remote_name(&self) -> Option<&str> {
        match self {
            ClientError::Remote { name, .. } => Some(name.rsplit('.').next().unwrap_or(name)),
            _ => None,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Connect { socket, err } => write!(
                f,
                "cannot reach emberd at {} ({err}); is emberd running? (set EMBER_SOCKET in containerd's environment for another socket)",
                socket.display()
            ),
            ClientError::Timeout {
                socket,
                method,
                after,
            } => write!(
                f,
                "emberd at {} did not answer {method} within {} s; is it stuck?",
                socket.display(),
                after.as_secs_f64()
            ),
            ClientError::Io { socket, err } => {
                write!(f, "connection to emberd at {} failed: {err}", socket.display())
            }
            ClientError::Protocol { socket, reason } => {
                write!(f, "emberd at {} answered badly: {reason}", socket.display())
            }
            ClientError::Remote { name, parameters } => {
                let short = name.rsplit('.').next().unwrap_or(name);
                let detail = ["reason", "name", "id", "path"]
                    .iter()
                    .filter_map(|k| parameters.get(*k).and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(": ");
                if detail.is_empty() {
                    write!(f, "emberd: {short}")
                } else {
                    write!(f, "emberd: {short}: {detail}")
                }
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// What RunContainer needs for one container.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RunParams {
    pub id: String,
    pub path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub netns: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory_max: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(skip_serializing_if = "HashMap::is_empty")]
    pub labels: HashMap<String, String>,
}

/// RunContainer's answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Started {
    pub name: String,
    pub pid: u32,
}

/// WaitContainer's final answer.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Exited {
    pub exit_status: i64,
    #[serde(default)]
    pub signal: Option<i64>,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub exited_at: String,
}

/// A connection to emberd.
pub struct Client {
    socket: PathBuf,
    reader: BufReader<UnixStream>,
    /// The reply deadline of calls but `RunContainer` and `WaitContainer`.
    call_timeout: Duration,
    /// The method of the call in flight, and its deadline (`None`: none).
    pending: (&'static str, Option<Duration>),
}

impl Client {
    /// Connects to emberd's control socket, within [`CONNECT_TIMEOUT`].
    pub fn connect(socket: &Path) -> Result<Self, ClientError> {
        Self::connect_within(socket, CONNECT_TIMEOUT)
    }

    /// Connects within `limit`: `connect(2)` on a Unix socket blocks while
    /// the listener's backlog is full, so it runs on a thread of its own
    /// that is left behind if it takes longer.
    pub fn connect_within(socket: &Path, limit: Duration) -> Result<Self, ClientError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let path = socket.to_path_buf();
        std::thread::spawn(move || {
            let _ = tx.send(UnixStream::connect(&path));
        });
        let stream = match rx.recv_timeout(limit) {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connecting took over {} s", limit.as_secs_f64()),
            )),
        }
        .map_err(|err| ClientError::Connect {
            socket: socket.to_path_buf(),
            err,
        })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
            call_timeout: CALL_TIMEOUT,
            pending: ("", None),
        })
    }

    /// Sets the reply deadline of the calls but `RunContainer` and
    /// `WaitContainer` (default [`CALL_TIMEOUT`]; the tests' shorter).
    #[cfg(test)]
    pub fn set_call_timeout(&mut self, limit: Duration) {
        self.call_timeout = limit;
    }

    fn io(&self, err: io::Error) -> ClientError {
        match (err.kind(), self.pending) {
            (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, (method, Some(after))) => {
                ClientError::Timeout {
                    socket: self.socket.clone(),
                    method: method.to_owned(),
                    after,
                }
            }
            _ => ClientError::Io {
                socket: self.socket.clone(),
                err,
            },
        }
    }

    /// Sends a call whose reply may take up to `limit` (`None`: no limit).
    fn send(
        &mut self,
        method: &'static str,
        parameters: Value,
        more: bool,
        limit: Option<Duration>,
    ) -> Result<(), ClientError> {
        self.pending = (method, limit);
        let stream = self.reader.get_ref();
        let set = stream
            .set_read_timeout(limit)
            .and_then(|()| stream.set_write_timeout(Some(limit.unwrap_or(CALL_TIMEOUT))));
        set.map_err(|e| self.io(e))?;
        let mut call = json!({
            "method": format!("{INTERFACE}.{method}"),
            "parameters": parameters,
        });
        if more {
            call["more"] = Value::Bool(true);
        }
        let mut frame = serde_json::to_vec(&call).expect("a call always serializes");
        frame.push(0);
        let r = self.reader.get_mut().write_all(&frame);
        r.map_err(|e| self.io(e))
    }

    /// Reads one reply: `(parameters, continues)`, or the Varlink error.
    fn receive(&mut self) -> Result<(Map<String, Value>, bool), ClientError> {
        let mut frame = Vec::new();
        let n = self
            .reader
            .read_until(0, &mut frame)
            .map_err(|e| self.io(e))?;
        if n == 0 || frame.last() != Some(&0) {
            return Err(self.io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "emberd closed the connection before replying",
            )));
        }
        frame.pop();
        let reply: Value = serde_json::from_slice(&frame).map_err(|e| ClientError::Protocol {
            socket: self.socket.clone(),
            reason: format!("reply is not JSON: {e}"),
        })?;
        let parameters = match reply.get("parameters") {
            Some(Value::Object(m)) => m.clone(),
            _ => Map::new(),
        };
        if let Some(name) = reply.get("error").and_then(Value::as_str) {
            return Err(ClientError::Remote {
                name: name.to_string(),
                parameters,
            });
        }
        let continues = reply
            .get("continues")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok((parameters, continues))
    }

    /// One call, one reply, within the call timeout.
    pub fn call(
        &mut self,
        method: &'static str,
        parameters: Value,
    ) -> Result<Map<String, Value>, ClientError> {
        let limit = self.call_timeout;
        self.call_within(method, parameters, limit)
    }

    fn call_within(
        &mut self,
        method: &'static str,
        parameters: Value,
        limit: Duration,
    ) -> Result<Map<String, Value>, ClientError> {
        self.send(method, parameters, false, Some(limit))?;
        Ok(self.receive()?.0)
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        reply: Map<String, Value>,
    ) -> Result<T, ClientError> {
        serde_json::from_value(Value::Object(reply)).map_err(|e| ClientError::Protocol {
            socket: self.socket.clone(),
            reason: format!("{method} reply: {e}"),
        })
    }

    /// RunContainer: answers once the instance is running.
    pub fn run_container(&mut self, params: &RunParams) -> Result<Started, ClientError> {
        let reply = self.call_within(
            "RunContainer",
            serde_json::to_value(params).expect("serializes"),
            RUN_TIMEOUT.max(self.call_timeout),
        )?;
        self.decode("RunContainer", reply)
    }

    /// WaitContainer: blocks until the container's worker has exited, with
    /// no deadline; emberd's end closes the connection (an error).
    pub fn wait_container(&mut self, id: &str) -> Result<Exited, ClientError> {
        self.send("WaitContainer", json!({ "id": id }), true, None)?;
        loop {
            let (reply, continues) = self.receive()?;
            if !continues {
                return self.decode("WaitContainer", reply);
            }
        }
    }

    /// KillContainer: SIGTERM/SIGINT stop gracefully, other signals go to the worker.
    pub fn kill_container(&mut self, id: &str, signal: u32) -> Result<(), ClientError> {
        self.call("KillContainer", json!({ "id": id, "signal": signal }))
            .map(|_| ())
    }

    /// RemoveContainer: forgets the container (killing it first if it runs).
    pub fn remove_container(&mut self, id: &str) -> Result<(), ClientError> {
        self.call("RemoveContainer", json!({ "id": id }))
            .map(|_| ())
    }

    /// UpdateContainer: new limits for a running container.
    pub fn update_container(
        &mut self,
        id: &str,
        memory_max: Option<i64>,
        cpu: Option<f64>,
    ) -> Result<(), ClientError> {
        let mut p = json!({ "id": id });
        if let Some(m) = memory_max {
            p["memory_max"] = json!(m);
        }
        if let Some(c) = cpu {
            p["cpu"] = json!(c);
        }
        self.call("UpdateContainer", p).map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixListener;
    use std::thread;

    fn read_frame(s: &mut UnixStream) -> Value {
        let mut buf = Vec::new();
        let mut byte = [0u8; 1];
        loop {
            s.read_exact(&mut byte).unwrap();
            if byte[0] == 0 {
                break;
            }
            buf.push(byte[0]);
        }
        serde_json::from_slice(&buf).unwrap()
    }

    fn write_frame(s: &mut UnixStream, v: Value) {
        let mut f = serde_json::to_vec(&v).unwrap();
        f.push(0);
        s.write_all(&f).unwrap();
    }

    /// A server on a socket the test binds: answers each connection's calls
    /// with `respond(call) -> replies`, and hands back the calls it saw.
    fn serve(
        conns: usize,
        respond: impl Fn(&Value) -> Vec<Value> + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf, thread::JoinHandle<Vec<Value>>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let h = thread::spawn(move || {
            let mut seen = Vec::new();
            for _ in 0..conns {
                let (mut s, _) = listener.accept().unwrap();
                let call = read_frame(&mut s);
                for r in respond(&call) {
                    write_frame(&mut s, r);
                }
                seen.push(call);
            }
            seen
        });
        (dir, path, h)
    }

    #[test]
    fn run_container_sends_the_contract_fields_and_decodes_the_pid() {
        let (_d, path, h) = serve(1, |_| {
            vec![json!({"parameters": {"name": "k8s-0123456789ab", "pid": 4242}})]
        });
        let mut c = Client::connect(&path).unwrap();
        let params = RunParams {
            id: "0123456789abcdef".into(),
            path: "/b/rootfs".into(),
            netns: Some("/var/run/netns/cni-1".into()),
            memory_max: Some(64 << 20),
            cpu: Some(0.5),
            stdout: Some("/fifo/out".into()),
            stderr: None,
            labels: HashMap::from([("io.kubernetes.pod.name".into(), "web".into())]),
        };
        let started = c.run_container(&params).unwrap();
        assert_eq!(
            started,
            Started {
                name: "k8s-0123456789ab".into(),
                pid: 4242
            }
        );
        let calls = h.join().unwrap();
        assert_eq!(calls[0]["method"], "io.ember.Supervisor.RunContainer");
        let p = &calls[0]["parameters"];
        assert_eq!(p["id"], "0123456789abcdef");
        assert_eq!(p["path"], "/b/rootfs");
        assert_eq!(p["netns"], "/var/run/netns/cni-1");
        assert_eq!(p["memory_max"], 64 << 20);
        assert_eq!(p["cpu"], 0.5);
        assert_eq!(p["stdout"], "/fifo/out");
        assert!(
            p.get("stderr").is_none(),
            "absent optional fields are left out: {p}"
        );
        assert_eq!(p["labels"]["io.kubernetes.pod.name"], "web");
        assert!(calls[0].get("more").is_none());
    }

    #[test]
    fn wait_container_subscribes_with_more_and_returns_the_final_reply() {
        let (_d, path, h) = serve(1, |_| {
            vec![
                json!({"parameters": {}, "continues": true}),
                json!({"parameters": {"exit_status": 137, "signal": 9, "reason": "oom",
                                      "exited_at": "2026-12-05T22:00:00.5Z"}}),
            ]
        });
        let mut c = Client::connect(&path).unwrap();
        let e = c.wait_container("abc").unwrap();
        assert_eq!(e.exit_status, 137);
        assert_eq!(e.signal, Some(9));
        assert_eq!(e.reason, "oom");
        assert_eq!(e.exited_at, "2026-12-05T22:00:00.5Z");
        let calls = h.join().unwrap();
        assert_eq!(calls[0]["method"], "io.ember.Supervisor.WaitContainer");
        assert_eq!(calls[0]["more"], true);
        assert_eq!(calls[0]["parameters"]["id"], "abc");
    }

    #[test]
    fn remote_errors_keep_their_name_and_say_why() {
        let (_d, path, h) = serve(2, |call| {
            if call["method"] == "io.ember.Supervisor.KillContainer" {
                vec![
                    json!({"error": "io.ember.Supervisor.ModuleNotFound", "parameters": {"name": "k8s-x"}}),
                ]
            } else {
                vec![json!({"error": "io.ember.Supervisor.Conflict",
                            "parameters": {"id": "x", "reason": "a container with this id runs"}})]
            }
        });
        let mut c = Client::connect(&path).unwrap();
        let e = c.kill_container("x", 15).unwrap_err();
        assert_eq!(e.remote_name(), Some("ModuleNotFound"));
        assert_eq!(e.to_string(), "emberd: ModuleNotFound: k8s-x");
        let mut c = Client::connect(&path).unwrap();
        let e = c
            .run_container(&RunParams {
                id: "x".into(),
                path: "/p".into(),
                ..Default::default()
            })
            .unwrap_err();
        assert_eq!(e.remote_name(), Some("Conflict"));
        assert!(
            e.to_string().contains("a container with this id runs"),
            "{e}"
        );
        let calls = h.join().unwrap();
        assert_eq!(calls[0]["parameters"]["signal"], 15);
    }

    #[test]
    fn a_call_emberd_never_answers_times_out_but_a_wait_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("control.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = thread::spawn(move || {
            // A call read and never answered; the connection kept open
            // until the client gave up.
            let (mut s, _) = listener.accept().unwrap();
            let call = read_frame(&mut s);
            done_rx.recv().unwrap();
            drop(s);
            // A wait subscribed, answered nothing for longer than the
            // calls' deadline, then emberd's end: the connection closes.
            let (mut s, _) = listener.accept().unwrap();
            let wait = read_frame(&mut s);
            write_frame(&mut s, json!({"parameters": {}, "continues": true}));
            done_rx.recv().unwrap();
            drop(s);
            (call, wait)
        });
        let mut c = Client::connect(&path).unwrap();
        c.set_call_timeout(Duration::from_millis(100));
        let e = c.kill_container("x", 15).unwrap_err();
        assert!(matches!(e, ClientError::Timeout { .. }), "{e:?}");
        assert!(
            e.to_string().contains("did not answer KillContainer"),
            "{e}"
        );
        done_tx.send(()).unwrap();

        let mut c = Client::connect(&path).unwrap();
        c.set_call_timeout(Duration::from_millis(100));
        let waiter = thread::spawn(move || c.wait_container("x"));
        // Still waiting well past the calls' deadline.
        thread::sleep(Duration::from_millis(500));
        assert!(!waiter.is_finished(), "WaitContainer gave up on its own");
        done_tx.send(()).unwrap();
        let e = waiter.join().unwrap().unwrap_err();
        assert!(matches!(e, ClientError::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("closed the connection"), "{e}");
        let (call, wait) = h.join().unwrap();
        assert_eq!(call["method"], "io.ember.Supervisor.KillContainer");
        assert_eq!(wait["method"], "io.ember.Supervisor.WaitContainer");
    }

    #[test]
    fn a_connection_closed_before_the_reply_is_an_error_not_a_hang() {
        let (_d, path, h) = serve(1, |_| vec![]);
        let mut c = Client::connect(&path).unwrap();
        let e = c.remove_container("x").unwrap_err();
        assert!(matches!(e, ClientError::Io { .. }), "{e:?}");
        assert!(e.to_string().contains("closed the connection"), "{e}");
        h.join().unwrap();
    }

    #[test]
    fn a_missing_socket_names_the_path_and_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nope.sock");
        let e = Client::connect(&path).err().unwrap();
        let msg = e.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("EMBER_SOCKET"),
            "{msg}"
        );
    }
}
