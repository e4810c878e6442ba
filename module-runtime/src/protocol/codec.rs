//! The one codec of Ember's control messages (emberd ↔ zygote, emberd ↔
//! worker, and the fork path's hand-off): every message is one frame,
//!
//! ```text
//! magic "EMBW" | u16 version | u16 kind | u32 body_len | body
//! ```
//!
//! little-endian; strings are `u32 len | UTF-8`. Each message type lists its
//! kinds and body in `docs/abi.md` §4. Decoding reads every field once,
//! bounds-checked, and names the field it stopped at.

use crate::abi::GrantKind;

use super::Grant;

/// Protocol version carried in every frame.
pub const PROTOCOL_VERSION: u16 = 2;
/// Largest frame accepted (header included).
pub const MAX_FRAME: usize = 1 << 20;
pub(crate) const MAGIC: [u8; 4] = *b"EMBW";
pub(crate) const HEADER: usize = 12;

/// A frame that could not be decoded; the message names what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The frame ends before a field it declares.
    #[error("frame truncated: {what} needs {needed} bytes, {left} left")]
    Truncated {
        /// The field being read.
        what: &'static str,
        /// Bytes it needs.
        needed: usize,
        /// Bytes the frame had left.
        left: usize,
    },
    /// Not a control frame at all.
    #[error("not a control frame: magic {found:02x?}, expected \"EMBW\"")]
    BadMagic {
        /// The first four bytes.
        found: [u8; 4],
    },
    /// Unsupported protocol version.
    #[error("protocol version {0} (this side speaks version {PROTOCOL_VERSION})")]
    Version(u16),
    /// A kind the receiving side does not take.
    #[error("unknown frame kind {kind} for a {direction} message")]
    UnknownKind {
        /// The kind.
        kind: u16,
        /// The message type expected (e.g. `parent → worker`).
        direction: &'static str,
    },
    /// A field held a value outside its range.
    #[error("invalid value {value} for {field}")]
    InvalidValue {
        /// Field.
        field: &'static str,
        /// Value.
        value: u64,
    },
    /// A string field was not UTF-8.
    #[error("{0} is not UTF-8")]
    Utf8(&'static str),
    /// A field that carries text in another format (a plugin's TOML
    /// configuration) did not parse.
    #[error("{field} is malformed: {reason}")]
    Malformed {
        /// Field.
        field: &'static str,
        /// The parser's message.
        reason: String,
    },
    /// Bytes left after the message's last field.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// Larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
}

/// A message type of the protocol: one direction of one link.
pub trait Message: Sized {
    /// Which way it travels, for errors (`parent → worker`, …).
    const DIRECTION: &'static str;
    /// Encodes the frame.
    fn encode(&self) -> Vec<u8>;
    /// Decodes one complete frame.
    fn decode(buf: &[u8]) -> Result<Self, DecodeError>;
    /// How many descriptors travel with this message.
    fn fd_count(&self) -> usize {
        0
    }
}

/// Frame kinds, one number space for every message type (docs/abi.md §4).
pub(crate) mod kind {
    // Parent → worker.
    pub(crate) const LAUNCH: u16 = 1;
    pub(crate) const STOP: u16 = 2;
    pub(crate) const ATTACH: u16 = 3;
    /// More descriptors of the message before it (no body); any direction.
    pub(crate) const MORE_FDS: u16 = 4;
    pub(crate) const JOIN_CGROUPS: u16 = 5;
    // Worker → parent.
    pub(crate) const IDLE: u16 = 100;
    pub(crate) const TRANSITION: u16 = 101;
    pub(crate) const FAILED: u16 = 102;
    pub(crate) const LOG: u16 = 103;
    pub(crate) const SANDBOXED: u16 = 104;
    // Supervisor → zygote.
    pub(crate) const HELLO: u16 = 200;
    pub(crate) const FORK: u16 = 201;
    // Zygote → supervisor.
    pub(crate) const READY: u16 = 210;
    pub(crate) const HELLO_FAILED: u16 = 211;
    pub(crate) const FORKED: u16 = 212;
    pub(crate) const FORK_FAILED: u16 = 213;
    pub(crate) const REAPED: u16 = 214;
    // Intermediate process → zygote (the fork path's hand-off).
    pub(crate) const HANDED_OVER: u16 = 220;
    pub(crate) const HANDOFF_FAILED: u16 = 221;
}

/// Writes one frame.
pub(crate) struct Enc(Vec<u8>);

impl Enc {
    pub(crate) fn new(kind: u16) -> Self {
        let mut v = Vec::with_capacity(64);
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        v.extend_from_slice(&kind.to_le_bytes());
        v.extend_from_slice(&0u32.to_le_bytes());
        Self(v)
    }
    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub(crate) fn flag(&mut self, v: bool) {
        self.0.push(u8::from(v));
    }
    pub(crate) fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn i32(&mut self, v: i32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub(crate) fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A length or count; one that does not fit a `u32` cannot be framed
    /// anyway ([`MAX_FRAME`]), and the receiver then finds it truncated.
    pub(crate) fn len(&mut self, n: usize) {
        self.u32(u32::try_from(n).unwrap_or(u32::MAX));
    }
    pub(crate) fn str(&mut self, s: &str) {
        self.len(s.len());
        self.0.extend_from_slice(s.as_bytes());
    }
    pub(crate) fn strs<'s>(&mut self, v: impl ExactSizeIterator<Item = &'s str>) {
        self.len(v.len());
        for x in v {
            self.str(x);
        }
    }
    pub(crate) fn grants(&mut self, grants: &[Grant]) {
        self.len(grants.len());
        for g in grants {
            self.u32(g.kind as u32);
            self.str(&g.name);
        }
    }
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let body = u32::try_from(self.0.len() - HEADER).unwrap_or(u32::MAX);
        self.0[8..12].copy_from_slice(&body.to_le_bytes());
        self.0
    }
}

/// Reads one frame's body, field by field.
pub(crate) struct Dec<'a>(&'a [u8]);

impl<'a> Dec<'a> {
    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Truncated {
                what,
                needed: n,
                left: self.0.len(),
            });
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], DecodeError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N, what)?);
        Ok(a)
    }
    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(what)?[0])
    }
    pub(crate) fn u16(&mut self, what: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(i32::from_le_bytes(self.array(what)?))
    }
    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
    /// A `u8` that must be 0 or 1.
    pub(crate) fn flag(&mut self, what: &'static str) -> Result<bool, DecodeError> {
        match self.u8(what)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(DecodeError::InvalidValue {
                field: what,
                value: v.into(),
            }),
        }
    }
    /// A count of items that each take at least `min_item` bytes: checked
    /// against what is left before anything is allocated for them.
    pub(crate) fn count(
        &mut self,
        what: &'static str,
        min_item: usize,
    ) -> Result<usize, DecodeError> {
        let n = self.u32(what)? as usize;
        let needed = n.saturating_mul(min_item);
        if needed > self.0.len() {
            return Err(DecodeError::Truncated {
                what,
                needed,
                left: self.0.len(),
            });
        }
        Ok(n)
    }
    pub(crate) fn str(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let n = self.u32(what)? as usize;
        let b = self.take(n, what)?;
        std::str::from_utf8(b)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8(what))
    }
    pub(crate) fn strs(&mut self, what: &'static str) -> Result<Vec<String>, DecodeError> {
        let n = self.count(what, 4)?;
        (0..n).map(|_| self.str(what)).collect()
    }
    pub(crate) fn grants(&mut self) -> Result<Vec<Grant>, DecodeError> {
        let n = self.count("grants", 8)?;
        let mut grants = Vec::with_capacity(n);
        for _ in 0..n {
            let v = self.u32("grant kind")?;
            let kind = GrantKind::from_u32(v).ok_or(DecodeError::InvalidValue {
                field: "grant kind",
                value: v.into(),
            })?;
            grants.push(Grant {
                kind,
                name: self.str("grant name")?,
            });
        }
        Ok(grants)
    }
    /// Ends the body: nothing may be left.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(DecodeError::Trailing(n)),
        }
    }
}

/// Splits a frame into `(kind, body)` after checking its header.
pub(crate) fn open_frame(buf: &[u8]) -> Result<(u16, Dec<'_>), DecodeError> {
    if buf.len() > MAX_FRAME {
        return Err(DecodeError::TooLarge(buf.len()));
    }
    let mut d = Dec(buf);
    let found = d.array::<4>("frame magic")?;
    if found != MAGIC {
        return Err(DecodeError::BadMagic { found });
    }
    let version = d.u16("protocol version")?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::Version(version));
    }
    let kind = d.u16("frame kind")?;
    let len = d.u32("body length")? as usize;
    let body = d.take(len, "body")?;
    d.finish()?;
    Ok((kind, Dec(body)))
}

/// A continuation packet's frame: it carries the next descriptors of the
/// message before it, and nothing else.
pub fn more_fds_frame() -> Vec<u8> {
    Enc::new(kind::MORE_FDS).finish()
}

/// Whether `buf` is a continuation frame ([`more_fds_frame`]).
pub(crate) fn is_more_fds(buf: &[u8]) -> bool {
    matches!(open_frame(buf), Ok((kind::MORE_FDS, d)) if d.0.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u16, body: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&MAGIC);
        f.extend_from_slice(&PROTOCOL_VERSION.to_le_bytes());
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&(body.len() as u32).to_le_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn header_errors_name_what_was_wrong() {
        let good = frame(7, b"abc");
        let (k, d) = open_frame(&good).unwrap();
        assert_eq!((k, d.0), (7, &b"abc"[..]));
        let e = open_frame(b"EMB").err().unwrap();
        assert_eq!(
            e,
            DecodeError::Truncated {
                what: "frame magic",
                needed: 4,
                left: 3
            }
        );
        assert_eq!(
            e.to_string(),
            "frame truncated: frame magic needs 4 bytes, 3 left"
        );
        let e = open_frame(b"GET / HTTP/1.1\r\n").err().unwrap();
        assert_eq!(
            e.to_string(),
            "not a control frame: magic [47, 45, 54, 20], expected \"EMBW\""
        );
        let mut v9 = good.clone();
        v9[4] = 9;
        assert_eq!(
            open_frame(&v9).err().unwrap().to_string(),
            format!("protocol version 9 (this side speaks version {PROTOCOL_VERSION})")
        );
        // Body length past the end, and bytes past the body.
        let e = open_frame(&good[..good.len() - 1]).err().unwrap();
        assert_eq!(
            e,
            DecodeError::Truncated {
                what: "body",
                needed: 3,
                left: 2
            }
        );
        let mut long = good.clone();
        long.extend_from_slice(b"zz");
        assert_eq!(open_frame(&long).err().unwrap(), DecodeError::Trailing(2));
        let huge = vec![0u8; MAX_FRAME + 1];
        assert_eq!(
            open_frame(&huge).err().unwrap(),
            DecodeError::TooLarge(MAX_FRAME + 1)
        );
    }

    #[test]
    fn a_count_larger_than_the_frame_allocates_nothing() {
        // 4 billion strings of at least 4 bytes each cannot be in 4 bytes.
        let mut d = Dec(&[0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0]);
        assert!(matches!(
            d.strs("writable paths"),
            Err(DecodeError::Truncated {
                what: "writable paths",
                ..
            })
        ));
    }

    #[test]
    fn continuation_frames_are_recognized_exactly() {
        assert!(is_more_fds(&more_fds_frame()));
        assert!(!is_more_fds(&frame(kind::MORE_FDS, b"x")));
        assert!(!is_more_fds(&frame(kind::STOP, b"")));
    }
}
