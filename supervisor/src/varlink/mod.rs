//! The Varlink wire format (<https://varlink.org>): NUL-terminated JSON
//! messages on a stream socket.
//!
//! [`FrameDecoder`] splits the byte stream into frames and refuses frames
//! larger than a limit; [`Call::parse`] turns one frame into a typed call;
//! [`Reply`] is what the server writes back.

pub mod service;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The largest call the server accepts, terminator excluded. Calls are
/// small (names and paths); the limit bounds what a connection can make the
/// daemon buffer.
pub const MAX_MESSAGE: usize = 256 << 10;
/// The largest reply a client accepts (log tails are the big ones).
pub const MAX_REPLY: usize = 16 << 20;

/// A frame could not be cut from the byte stream.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// More than the limit arrived without a NUL terminator.
    #[error("message larger than {limit} bytes")]
    TooLarge {
        /// The limit in force.
        limit: usize,
    },
}

/// Cuts NUL-terminated frames out of a byte stream.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    limit: usize,
    /// Bytes of `buf` already scanned for a NUL without finding one.
    scanned: usize,
}

impl FrameDecoder {
    /// A decoder that refuses frames longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: Vec::new(),
            limit,
            scanned: 0,
        }
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame (terminator removed), `None` if more bytes
    /// are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        match self.buf[self.scanned..].iter().position(|&b| b == 0) {
            Some(rel) => {
                let end = self.scanned + rel;
                if end > self.limit {
                    return Err(FrameError::TooLarge { limit: self.limit });
                }
                let mut frame: Vec<u8> = self.buf.drain(..=end).collect();
                frame.pop();
                self.scanned = 0;
                Ok(Some(frame))
            }
            None => {
                self.scanned = self.buf.len();
                if self.buf.len() > self.limit {
                    Err(FrameError::TooLarge { limit: self.limit })
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Bytes buffered but not yet returned as a frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// A frame is not a valid Varlink call.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The frame is not UTF-8 JSON of the call shape.
    #[error("malformed call")]
    Malformed(#[source] serde_json::Error),
    /// The method name is not `interface.Method`.
    #[error("malformed method name {0:?}")]
    BadMethod(String),
}

/// One decoded Varlink call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Call {
    /// Fully qualified method, `interface.Method`.
    pub method: String,
    /// The call's parameters (an object; absent means empty).
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub parameters: Map<String, Value>,
    /// The client accepts several replies.
    #[serde(default, skip_serializing_if = "is_false")]
    pub more: bool,
    /// The client wants no reply.
    #[serde(default, skip_serializing_if = "is_false")]
    pub oneway: bool,
    /// Protocol upgrade (refused by this server).
    #[serde(default, skip_serializing_if = "is_false")]
    pub upgrade: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Call {
    /// Parses one frame (terminator removed).
    pub fn parse(frame: &[u8]) -> Result<Self, CallError> {
        let call: Call = serde_json::from_slice(frame).map_err(CallError::Malformed)?;
        call.interface_and_member()?;
        Ok(call)
    }

    /// A call with the given method and parameters.
    pub fn new(method: impl Into<String>, parameters: Value) -> Self {
        let parameters = match parameters {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        Self {
            method: method.into(),
            parameters,
            more: false,
            oneway: false,
            upgrade: false,
        }
    }

    /// Splits `method` into interface and member name.
    pub fn interface_and_member(&self) -> Result<(&str, &str), CallError> {
        match self.method.rsplit_once('.') {
            Some((iface, member))
                if !iface.is_empty()
                    && !member.is_empty()
                    && member.chars().all(|c| c.is_ascii_alphanumeric())
                    && member.starts_with(|c: char| c.is_ascii_uppercase()) =>
            {
                Ok((iface, member))
            }
            _ => Err(CallError::BadMethod(self.method.clone())),
        }
    }

    /// Encodes the call with its terminator.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("a call always serializes");
        v.push(0);
        v
    }
}

/// A reply as written on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// The reply's parameters.
    #[serde(default)]
    pub parameters: Map<String, Value>,
    /// More replies follow (only when the call had `more`).
    #[serde(default, skip_serializing_if = "is_false")]
    pub continues: bool,
    /// Error name, when the call failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Reply {
    /// A successful reply.
    pub fn ok(parameters: Value) -> Self {
        Self {
            parameters: into_map(parameters),
            continues: false,
            error: None,
        }
    }

    /// An error reply.
    pub fn error(name: impl Into<String>, parameters: Value) -> Self {
        Self {
            parameters: into_map(parameters),
            continues: false,
            error: Some(name.into()),
        }
    }

    /// Encodes the reply with its terminator.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec(self).expect("a reply always serializes");
        v.push(0);
        v
    }

    /// Parses one frame (terminator removed) as a reply.
    pub fn parse(frame: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(frame)
    }
}

fn into_map(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        Value::Null => Map::new(),
        other => {
            let mut m = Map::new();
            m.insert("value".into(), other);
            m
        }
    }
}

/// A named Varlink error, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct ErrorReply {
    /// Fully qualified error name.
    pub name: &'static str,
    /// Error parameters.
    pub parameters: Value,
}

impl ErrorReply {
    /// An error with the given name and parameters.
    pub fn new(name: &'static str, parameters: Value) -> Self {
        Self { name, parameters }
    }

    /// The reply to put on the wire.
    pub fn to_reply(&self) -> Reply {
        Reply::error(self.name, self.parameters.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn splits_frames_across_reads() {
        let mut d = FrameDecoder::new(64);
        d.extend(b"{\"a\":");
        assert_eq!(d.next_frame(), Ok(None));
        d.extend(b"1}\0{}\0{");
        assert_eq!(d.next_frame().unwrap().unwrap(), b"{\"a\":1}");
        assert_eq!(d.next_frame().unwrap().unwrap(), b"{}");
        assert_eq!(d.next_frame(), Ok(None));
        assert_eq!(d.pending(), 1);
    }

    #[test]
    fn refuses_oversized() {
        let mut d = FrameDecoder::new(8);
        d.extend(b"123456789");
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { limit: 8 }));
        let mut d = FrameDecoder::new(8);
        d.extend(b"123456789\0");
        assert_eq!(d.next_frame(), Err(FrameError::TooLarge { limit: 8 }));
        let mut d = FrameDecoder::new(8);
        d.extend(b"12345678\0");
        assert_eq!(d.next_frame().unwrap().unwrap(), b"12345678");
    }

    #[test]
    fn parses_calls() {
        let c = Call::parse(br#"{"method":"io.ember.Supervisor.List"}"#).unwrap();
        assert_eq!(
            c.interface_and_member().unwrap(),
            ("io.ember.Supervisor", "List")
        );
        assert!(!c.more && !c.oneway);
        let c = Call::parse(br#"{"method":"a.B","parameters":{"x":1},"more":true}"#).unwrap();
        assert!(c.more);
        assert!(Call::parse(br#"{"method":"nodot"}"#).is_err());
        assert!(Call::parse(br#"{"method":"a.b"}"#).is_err());
        assert!(Call::parse(br#"{"method":"a.B","parameters":[1]}"#).is_err());
        assert!(Call::parse(br#"{"method":"a.B","bogus":1}"#).is_err());
        assert!(Call::parse(b"\xff\xfe").is_err());
    }

    fn arb_call() -> impl Strategy<Value = Call> {
        (
            "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}\\.[A-Z][A-Za-z0-9]{0,10}",
            proptest::collection::btree_map("[a-z_]{1,8}", any::<i64>(), 0..4),
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(method, params, more, oneway)| {
                let parameters = params
                    .into_iter()
                    .map(|(k, v)| (k, Value::from(v)))
                    .collect();
                Call {
                    method,
                    parameters,
                    more,
                    oneway,
                    upgrade: false,
                }
            })
    }

    proptest! {
        #[test]
        fn decoder_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..20)) {
            let mut d = FrameDecoder::new(256);
            for c in chunks {
                d.extend(&c);
                loop {
                    match d.next_frame() {
                        Ok(Some(f)) => {
                            prop_assert!(f.len() <= 256);
                            prop_assert!(!f.contains(&0));
                            let _ = Call::parse(&f);
                        }
                        Ok(None) => break,
                        Err(FrameError::TooLarge { .. }) => return Ok(()),
                    }
                }
                prop_assert!(d.pending() <= 256);
            }
        }

        #[test]
        fn calls_round_trip_through_any_split(calls in proptest::collection::vec(arb_call(), 1..6), cut in proptest::collection::vec(1usize..50, 1..40)) {
            let mut wire = Vec::new();
            for c in &calls {
                wire.extend(c.encode());
            }
            let mut d = FrameDecoder::new(MAX_MESSAGE);
            let mut out = Vec::new();
            let mut pos = 0;
            let mut i = 0;
            while pos < wire.len() {
                let n = cut[i % cut.len()].min(wire.len() - pos);
                d.extend(&wire[pos..pos + n]);
                pos += n;
                i += 1;
                while let Some(f) = d.next_frame().unwrap() {
                    out.push(Call::parse(&f).unwrap());
                }
            }
            prop_assert_eq!(out, calls);
        }
    }
}
