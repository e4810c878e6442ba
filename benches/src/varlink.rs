//! A minimal blocking Varlink client for emberd's control socket
//! (`docs/control-protocol.md`): one JSON object per call, NUL-terminated.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// A call failed.
#[derive(Debug, thiserror::Error)]
pub enum VarlinkError {
    /// The socket could not be connected.
    #[error("cannot connect to {}", path.display())]
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Reading or writing the socket failed.
    #[error("control socket i/o failed")]
    Io(#[from] std::io::Error),
    /// The reply is not the JSON expected.
    #[error("malformed reply")]
    Json(#[from] serde_json::Error),
    /// The daemon hung up before replying.
    #[error("the daemon closed the connection")]
    Closed,
    /// The daemon answered with an error.
    #[error("{error} {parameters}")]
    Remote {
        /// The error name, e.g. `io.ember.Supervisor.ModuleNotFound`.
        error: String,
        /// Its parameters.
        parameters: Value,
    },
}

/// One connection to the control socket.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to `path`.
    pub fn connect(path: &Path) -> Result<Self, VarlinkError> {
        let stream = UnixStream::connect(path).map_err(|source| VarlinkError::Connect {
            path: path.to_owned(),
            source,
        })?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Self {
            stream,
            buf: Vec::with_capacity(4096),
        })
    }

    /// Calls `method` (e.g. `io.ember.Supervisor.Status`) and returns the
    /// reply's `parameters` (an empty object when absent).
    pub fn call(&mut self, method: &str, parameters: Value) -> Result<Value, VarlinkError> {
        self.send(method, parameters)?;
        self.receive()
    }

    /// Sends a call without waiting for its reply (see [`Client::receive`]).
    pub fn send(&mut self, method: &str, parameters: Value) -> Result<(), VarlinkError> {
        let mut msg = serde_json::to_vec(&json!({"method": method, "parameters": parameters}))?;
        msg.push(0);
        self.stream.write_all(&msg)?;
        Ok(())
    }

    /// Sends a call with `more` (read its replies with
    /// [`Client::receive_more`]).
    pub fn send_more(&mut self, method: &str, parameters: Value) -> Result<(), VarlinkError> {
        let mut msg =
            serde_json::to_vec(&json!({"method": method, "parameters": parameters, "more": true}))?;
        msg.push(0);
        self.stream.write_all(&msg)?;
        Ok(())
    }

    /// Reads one reply of a call with `more`: its parameters and whether
    /// more replies follow.
    pub fn receive_more(&mut self) -> Result<(Value, bool), VarlinkError> {
        let reply = self.read_message()?;
        let continues = serde_json::from_slice::<Value>(&reply)?
            .get("continues")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok((self.parse(&reply)?, continues))
    }

    /// Reads the reply to the oldest call sent and not yet answered.
    pub fn receive(&mut self) -> Result<Value, VarlinkError> {
        let reply = self.read_message()?;
        self.parse(&reply)
    }

    fn parse(&self, reply: &[u8]) -> Result<Value, VarlinkError> {
        let mut v: Value = serde_json::from_slice(reply)?;
        let params = v
            .get_mut("parameters")
            .map(Value::take)
            .unwrap_or_else(|| json!({}));
        match v.get("error").and_then(Value::as_str) {
            Some(e) => Err(VarlinkError::Remote {
                error: e.to_owned(),
                parameters: params,
            }),
            None => Ok(params),
        }
    }

    /// Calls `io.ember.Supervisor.<method>`.
    pub fn ember(&mut self, method: &str, parameters: Value) -> Result<Value, VarlinkError> {
        self.call(&format!("io.ember.Supervisor.{method}"), parameters)
    }

    fn read_message(&mut self) -> Result<Vec<u8>, VarlinkError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == 0) {
                let msg = self.buf[..i].to_vec();
                self.buf.drain(..=i);
                return Ok(msg);
            }
            let mut chunk = [0u8; 8192];
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(VarlinkError::Closed);
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn calls_and_maps_errors() {
        let dir = crate::artifacts::TempDir::new("ember-bench-varlink").unwrap();
        let path = dir.path().join("s");
        let l = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut calls = Vec::new();
            for reply in [
                &b"{\"parameters\":{\"x\":1}}\0"[..],
                &b"{\"error\":\"e.NotFound\",\"parameters\":{\"name\":\"n\"}}\0"[..],
            ] {
                let mut got = Vec::new();
                let mut b = [0u8; 1];
                while b[0] != 0 || got.is_empty() {
                    s.read_exact(&mut b).unwrap();
                    got.push(b[0]);
                }
                calls.push(got);
                // Split the reply across writes: the client must reassemble it.
                s.write_all(&reply[..5]).unwrap();
                s.write_all(&reply[5..]).unwrap();
            }
            calls
        });
        let mut c = Client::connect(&path).unwrap();
        assert_eq!(c.call("a.B", json!({})).unwrap(), json!({"x": 1}));
        match c.ember("Status", json!({"name": "n"})) {
            Err(VarlinkError::Remote { error, parameters }) => {
                assert_eq!(error, "e.NotFound");
                assert_eq!(parameters, json!({"name": "n"}));
            }
            other => panic!("{other:?}"),
        }
        let calls = server.join().unwrap();
        let second: Value = serde_json::from_slice(&calls[1][..calls[1].len() - 1]).unwrap();
        assert_eq!(second["method"], "io.ember.Supervisor.Status");
    }
}
