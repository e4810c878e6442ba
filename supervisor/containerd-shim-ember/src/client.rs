//! A small Varlink client for emberd's control socket: JSON messages ended by
//! a NUL byte, the `io.ember.Supervisor` container methods only.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

/// The socket emberd listens on when `$EMBER_SOCKET` is not set.
pub const DEFAULT_SOCKET: &str = "/run/ember/control.sock";

const INTERFACE: &str = "io.ember.Supervisor";

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
}

impl Client {
    /// Connects to emberd's control socket.
    pub fn connect(socket: &Path) -> Result<Self, ClientError> {
        let stream = UnixStream::connect(socket).map_err(|err| ClientError::Connect {
            socket: socket.to_path_buf(),
            err,
        })?;
        Ok(Self {
            socket: socket.to_path_buf(),
            reader: BufReader::new(stream),
        })
    }

    fn io(&self, err: io::Error) -> ClientError {
        ClientError::Io {
            socket: self.socket.clone(),
            err,
        }
    }

    fn send(&mut self, method: &str, parameters: Value, more: bool) -> Result<(), ClientError> {
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

    /// One call, one reply.
    pub fn call(
        &mut self,
        method: &str,
        parameters: Value,
    ) -> Result<Map<String, Value>, ClientError> {
        self.send(method, parameters, false)?;
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
        let reply = self.call(
            "RunContainer",
            serde_json::to_value(params).expect("serializes"),
        )?;
        self.decode("RunContainer", reply)
    }

    /// WaitContainer: blocks until the container's worker has exited.
    pub fn wait_container(&mut self, id: &str) -> Result<Exited, ClientError> {
        self.send("WaitContainer", json!({ "id": id }), true)?;
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
